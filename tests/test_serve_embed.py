"""POST /v1/embeddings on a tiny random BERT: a real uvicorn server on loopback, the real openai client."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from _server import LiveServer  # noqa: E402

import onnxllm  # noqa: E402
from onnxllm.serve import ServeOptions  # noqa: E402

NAME = "tiny-embed"
TEXTS = ["The cat sat on the mat.", "hello", "What is the capital of France?"]


@pytest.fixture(scope="module")
def tiny_embed(tmp_path_factory) -> Path:
    from _tiny_encoder import make_tiny_encoder

    base = tmp_path_factory.mktemp("serve_embed")
    return onnxllm.export(make_tiny_encoder(base, "bert"), base / NAME)


@pytest.fixture(scope="module")
def server(tiny_embed, decoder_package):
    with LiveServer(ServeOptions(models=(str(tiny_embed), str(decoder_package)))) as live:
        yield live


@pytest.fixture(scope="module")
def decoder_package(tiny_packages) -> Path:
    return tiny_packages("llama")


def test_embeddings_through_the_openai_client(server, tiny_embed):
    client = server.openai()
    want = onnxllm.load(tiny_embed).embed(TEXTS)
    result = client.embeddings.create(model=NAME, input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in result.data] == [0, 1, 2] and result.model == NAME
    np.testing.assert_allclose([d.embedding for d in result.data], want, atol=1e-6)
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(want.token_counts)
    floats = client.embeddings.create(model=NAME, input="hello", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[1], atol=1e-6)


def test_embeddings_wire_format(server, tiny_embed):
    want = onnxllm.load(tiny_embed).embed(["hello"])
    body = httpx.post(f"{server.url}/v1/embeddings",
                      json={"model": NAME, "input": ["hello"], "encoding_format": "base64"}).json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding" and "truncated" not in body
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, want[0], atol=1e-6)
    long = " ".join(["word"] * 200)
    body = httpx.post(f"{server.url}/v1/embeddings", json={"model": NAME, "input": ["hi", long]}).json()
    counts = onnxllm.load(tiny_embed).embed(["hi", long]).token_counts
    assert counts[1] == 64 and body["truncated"] == [1] and body["usage"]["prompt_tokens"] == sum(counts)


@pytest.mark.parametrize("payload,param", [
    ({"input": [""]}, "input"),
    ({"input": []}, "input"),
    ({"input": [1, 2, 3]}, "input"),
    ({"input": ["hi"], "dimensions": 8}, "dimensions"),
    ({"input": [" ".join(["word"] * 200)], "truncate": False}, "input"),
])
def test_bad_embedding_requests_are_400(server, payload, param):
    client = server.openai()
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=NAME, **{k: v for k, v in payload.items() if k != "truncate"},
                                 extra_body={"truncate": payload["truncate"]} if "truncate" in payload else None)
    assert info.value.body["param"] == param and "\n" not in info.value.body["message"]


def test_wrong_kind_of_model_is_400(server, decoder_package):
    client = server.openai()
    decoder = decoder_package.name
    with pytest.raises(openai.BadRequestError, match="without an embedding mode"):
        client.embeddings.create(model=decoder, input=["hello"])
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input=["hello"])
    health = httpx.get(f"{server.url}/health").json()
    assert next(m for m in health["models"] if m["id"] == NAME)["served"] >= 2
