"""Embedding packages: texts -> one vector each, through one ONNX Runtime session.

Texts are tokenized in one call (the tokenizers library batches in Rust), sorted by length so each
batch pads little, padded to the longest text of its batch with an attention mask (the graph pools
over the mask, so padding never changes a vector), run, L2-normalized when asked, and put back in
the caller's order. Texts longer than the model's limit are truncated and reported, or refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import EmbeddingError, GenerationError, InvalidPackageError
from ..package import EmbeddingSpec, Manifest

DEFAULT_BATCH = 32


class Embeddings(np.ndarray):
    """A float32 (N, D) array of vectors, one per text, that also says which texts were truncated.

    `truncated`: indices of the texts cut to the model's limit; `token_counts`: tokens each text used
    (after truncation). Arrays derived from this one (slices, arithmetic) carry neither (None)."""

    truncated: tuple[int, ...] | None
    token_counts: tuple[int, ...] | None

    @staticmethod
    def wrap(vectors: np.ndarray, truncated: tuple[int, ...], token_counts: tuple[int, ...]) -> "Embeddings":
        out = np.asarray(vectors, dtype=np.float32).view(Embeddings)
        out.truncated, out.token_counts = truncated, token_counts
        return out

    def __array_finalize__(self, obj) -> None:
        self.truncated = None
        self.token_counts = None


@dataclass(frozen=True)
class SearchHit:
    index: int  # position in the corpus
    score: float  # cosine similarity to the query
    text: str


def check_texts(texts) -> list[str]:
    """A list of non-empty strings, or a one-line EmbeddingError saying which item is wrong."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise EmbeddingError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    if not texts:
        raise EmbeddingError("no texts to embed: pass at least one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise EmbeddingError(f"texts[{i}] is a {type(text).__name__}, not a string; pass strings only")
        if not text.strip():
            raise EmbeddingError(f"texts[{i}] is empty; remove it or give some text")
        if "\x00" in text:
            raise EmbeddingError(f"texts[{i}] contains a NUL character; remove it")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise EmbeddingError(f"texts[{i}] contains invalid Unicode (a lone surrogate)") from None
    return list(texts)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)  # sentence-transformers' F.normalize eps


def rank(query: np.ndarray, corpus: np.ndarray, texts: Sequence[str], top_k: int) -> list[SearchHit]:
    """The top_k corpus rows by cosine similarity to `query` (1-D), best first."""
    scores = l2_normalize(np.asarray(corpus, np.float32)) @ l2_normalize(np.asarray(query, np.float32)[None])[0]
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [SearchHit(int(i), float(scores[i]), texts[i]) for i in order]


class EmbeddingModel:
    """A loaded embedding package. `embed` is thread-safe (ORT sessions and tokenizers are)."""

    def __init__(self, root: Path, manifest: Manifest, variant: str, session, tokenizer, choice):
        self.root = root
        self.manifest = manifest
        self.spec: EmbeddingSpec = manifest.embedding
        self.variant = variant
        self.session = session
        self.tokenizer = tokenizer
        self.placement = choice
        self.template = None  # embedding models do not chat
        names = {i.name for i in session.get_inputs()}
        missing = [n for n in self.spec.inputs if n not in names]
        if missing or self.spec.output not in {o.name for o in session.get_outputs()}:
            raise InvalidPackageError(
                f"{root}: the graph's inputs/outputs do not match the manifest "
                f"(missing {missing or [self.spec.output]}); re-export the package"
            )

    @property
    def dimension(self) -> int:
        return self.spec.dimension

    @property
    def max_tokens(self) -> int:
        return self.spec.max_tokens

    def embed(self, texts: str | Sequence[str], *, batch_size: int = DEFAULT_BATCH, normalize: bool | None = None,
              truncate: bool = True) -> Embeddings:
        """Vectors for `texts` as a float32 (N, D) array, in the order given.

        normalize: L2-normalize (default: what the model was trained with, from the package manifest).
        truncate: cut texts longer than the model's limit and list them in `result.truncated` (default),
        or refuse them with an EmbeddingError."""
        texts = check_texts(texts)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise EmbeddingError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        cut = tuple(i for i, e in enumerate(encodings) if e.overflowing)
        if cut and not truncate:
            raise EmbeddingError(
                f"texts[{cut[0]}] is longer than the model's limit of {self.max_tokens} tokens "
                f"({len(cut)} text(s) are); shorten it, or pass truncate=True to cut it"
            )
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(-lengths, kind="stable")  # longest first: each batch pads to similar lengths
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            width = int(lengths[rows].max())
            ids = np.full((len(rows), width), self.spec.pad_token_id, dtype=np.int64)  # (B, T)
            mask = np.zeros((len(rows), width), dtype=np.int64)  # (B, T): 1 = real token
            for r, i in enumerate(rows):
                n = lengths[i]
                ids[r, :n] = encodings[i].ids
                mask[r, :n] = 1
            feed = dict(zip(self.spec.inputs, (ids, mask)))
            out[rows] = self.session.run([self.spec.output], feed)[0]  # (B, D)
        if self.spec.normalize if normalize is None else normalize:
            out = l2_normalize(out)
        return Embeddings.wrap(out, cut, tuple(int(n) for n in lengths))

    def search(self, query: str, corpus: Sequence[str], *, top_k: int = 5, batch_size: int = DEFAULT_BATCH,
               corpus_vectors: np.ndarray | None = None) -> list[SearchHit]:
        """The `top_k` texts of `corpus` closest to `query` by cosine similarity, best first."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise EmbeddingError(f"top_k must be an integer >= 1, got {top_k!r}")
        corpus = check_texts(corpus)
        vectors = self.embed(corpus, batch_size=batch_size) if corpus_vectors is None else corpus_vectors
        return rank(self.embed([query])[0], vectors, corpus, top_k)

    # -- what a text-generation model does, refused in one line ----------------------------------
    def _no_generation(self, *args, **kwargs):
        raise GenerationError(
            f"{self.root.name} is an embedding model: it turns text into vectors and cannot generate text; "
            "use model.embed(texts) (onnxllm embed), or load a text-generation model"
        )

    generate = stream = chat = config = _no_generation

    def info(self) -> dict:
        from .info import package_info

        return package_info(self.root, self.manifest, providers=self.placement)


def embedding_tokenizer(tokenizer, spec: EmbeddingSpec):
    """The package tokenizer set up for embedding: our truncation, no padding of its own (we pad per batch)."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.enable_truncation(max_length=spec.max_tokens)
    return tokenizer


def no_embedding_mode(root: Path) -> EmbeddingError:
    return EmbeddingError(
        f"{root.name} is a text-generation model without an embedding mode; embed with an embedding package "
        "(e.g. the catalog's all-minilm-l6-v2, or `onnxllm export` of a sentence-transformers model)"
    )
