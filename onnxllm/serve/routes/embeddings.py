"""POST /v1/embeddings: vectors for one text or a list, from an embedding package (runtime/embed.py)."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request

from ..schemas import EmbeddingData, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from ..sse import cancel_on_disconnect
from .common import refuse, registry

router = APIRouter()


def _texts(body: EmbeddingRequest) -> list[str]:
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if any(not isinstance(t, str) for t in texts):
        raise refuse("input", "token-id inputs are not supported; send the text itself")
    return texts  # empty texts or lists: Model.embed says which item, mapped to 400


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post("/v1/embeddings", response_model=None)
async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
    texts, truncate = _texts(body), body.truncate
    run = registry(request).open(body.model, lambda model, cancel: iter([model.embed(texts, truncate=truncate)]))
    async with cancel_on_disconnect(request.receive, run.cancel):
        await run.ready()
        vectors = await anext(run)
    if body.dimensions is not None and body.dimensions != vectors.shape[1]:
        raise refuse("dimensions", f"this model's vectors have {vectors.shape[1]} dimensions; it cannot shorten them")
    tokens = int(sum(vectors.token_counts))
    return EmbeddingList(
        data=[EmbeddingData(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)],
        model=body.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        truncated=list(vectors.truncated) or None,
    ).model_dump(exclude_none=True)
