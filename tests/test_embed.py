"""Embedding packages from tiny random encoders: parity with PyTorch, batching, padding, truncation, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxllm
from onnxllm.errors import EmbeddingError, GenerationError, InvalidPackageError, QuantizeError, UnsupportedModelError

TEXTS = ["The cat sat on the mat.", "hello", "Stock markets fell sharply on Tuesday, 3.5% down by noon!",
         "a b c d e f g", "What is the capital of France?"]
LONG = " ".join(["word"] * 200)  # over the tiny models' 64-token limit


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """(family, pooling, normalize) -> (checkpoint folder, exported package), made once per module."""
    from _tiny_encoder import make_tiny_encoder

    made: dict = {}

    def get(model_type: str = "bert", pooling: str = "mean", normalize: bool = True):
        key = (model_type, pooling, normalize)
        if key not in made:
            base = tmp_path_factory.mktemp(f"{model_type}-{pooling}")
            folder = make_tiny_encoder(base, model_type, pooling=pooling, normalize=normalize)
            made[key] = folder, onnxllm.export(folder, base / "pkg")
        return made[key]

    return get


def _pytorch(folder: Path, texts: list[str], pooling: str, normalize: bool) -> np.ndarray:
    """The reference, independent of the exporter: transformers' tokenizer and model, pooling by hand."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=1)
    return pooled.numpy()


@pytest.mark.parametrize("model_type,pooling,normalize", [("bert", "mean", True), ("roberta", "cls", True),
                                                          ("xlm-roberta", "mean", False)])
def test_embeddings_equal_pytorch(encoders, model_type, pooling, normalize):
    folder, pkg = encoders(model_type, pooling, normalize)
    manifest = json.loads((pkg / "onnxllm.json").read_text())
    assert manifest["kind"] == "embedding"
    assert manifest["embedding"]["pooling"] == pooling and manifest["embedding"]["normalize"] is normalize
    assert manifest["source"]["pooling_from"] == "modules.json"
    assert manifest["variants"]["fp32"]["method"]["fused"].get("Attention") == 2  # ORT's fused kernels are in use
    model = onnxllm.load(pkg)
    got = model.embed(TEXTS)
    want = _pytorch(folder, TEXTS, pooling, normalize)
    assert got.shape == (len(TEXTS), 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    norms = np.linalg.norm(got, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) if normalize else not np.allclose(norms, 1.0, atol=1e-3)


def test_batched_equals_one_at_a_time_and_padding_changes_nothing(encoders):
    _, pkg = encoders("bert")
    model = onnxllm.load(pkg)
    together = model.embed(TEXTS, batch_size=len(TEXTS))  # one batch: every text padded to the longest
    for i, text in enumerate(TEXTS):
        alone = model.embed([text])  # no padding at all
        np.testing.assert_allclose(together[i], alone[0], atol=1e-6, rtol=0)
    for batch_size in (1, 2, 3):
        np.testing.assert_allclose(model.embed(TEXTS, batch_size=batch_size), together, atol=1e-6, rtol=0)
    # the same short text next to ever longer neighbours: its vector does not move
    short = model.embed(["hello"])[0]
    for width in (5, 20, 60):
        batch = model.embed(["hello", " ".join(["x"] * width)])
        np.testing.assert_allclose(batch[0], short, atol=1e-6, rtol=0)


def test_normalize_override_and_order(encoders):
    _, pkg = encoders("bert")
    model = onnxllm.load(pkg)
    raw = model.embed(TEXTS, normalize=False)
    unit = model.embed(TEXTS)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    reversed_ = model.embed(TEXTS[::-1])
    np.testing.assert_allclose(reversed_[::-1], unit, atol=1e-6)
    assert model.embed("one string").shape == (1, 64)


def test_truncation_is_reported_or_refused(encoders):
    _, pkg = encoders("bert")
    model = onnxllm.load(pkg)
    assert model.max_tokens == 64
    out = model.embed(["short text", LONG, "another"])
    assert out.truncated == (1,)
    assert out.token_counts[1] == 64 and out.token_counts[0] < 64
    np.testing.assert_allclose(out[1], model.embed([" ".join(["word"] * 62)])[0], atol=1e-6)  # 62 words + 2 specials
    assert model.embed(["short text"]).truncated == ()
    with pytest.raises(EmbeddingError, match=r"texts\[1\] is longer than the model's limit of 64 tokens"):
        model.embed(["short text", LONG], truncate=False)


@pytest.mark.parametrize("texts,message", [
    ([""], r"texts\[0\] is empty"),
    (["fine", "   "], r"texts\[1\] is empty"),
    (["fine", 3], r"texts\[1\] is a int, not a string"),
    (["fine", None], r"texts\[1\] is a NoneType"),
    ([], "no texts to embed"),
    (42, "must be a string or a list of strings"),
    (["a\x00b"], "NUL"),
])
def test_bad_input_is_one_line(encoders, texts, message):
    model = onnxllm.load(encoders("bert")[1])
    with pytest.raises(EmbeddingError, match=message) as info:
        model.embed(texts)
    assert "\n" not in str(info.value)


def test_batch_size_and_top_k_are_checked(encoders):
    model = onnxllm.load(encoders("bert")[1])
    with pytest.raises(EmbeddingError, match="batch_size must be an integer >= 1"):
        model.embed(TEXTS, batch_size=0)
    with pytest.raises(EmbeddingError, match="top_k must be an integer >= 1"):
        model.search("q", TEXTS, top_k=0)


def test_encoder_cannot_generate_and_decoder_cannot_embed(encoders, package):
    model = onnxllm.load(encoders("bert")[1])
    for call in (model.generate, model.stream, model.chat):
        with pytest.raises(GenerationError, match="is an embedding model"):
            call("hello")
    decoder = onnxllm.load(package("llama"))
    with pytest.raises(EmbeddingError, match="text-generation model without an embedding mode"):
        decoder.embed(["hello"])
    with pytest.raises(EmbeddingError, match="without an embedding mode"):
        onnxllm.search(decoder, "hello", ["a", "b"])


def test_search_ranks_by_cosine(encoders):
    model = onnxllm.load(encoders("bert")[1])
    corpus = TEXTS + ["The cat sat on the mat!"]
    hits = onnxllm.search(model, "The cat sat on the mat.", corpus, top_k=3)
    assert [h.index for h in hits][:1] == [0] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    vectors = model.embed(corpus)
    query = model.embed(["The cat sat on the mat."])[0]
    expected = np.argsort(-(vectors @ query), kind="stable")[:3]
    assert [h.index for h in hits] == list(expected)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    assert len(onnxllm.search(model, "x", corpus, top_k=100)) == len(corpus)
    np.testing.assert_allclose(onnxllm.embed(model, TEXTS), vectors[:len(TEXTS)], atol=1e-6)


def test_pooling_read_from_sentence_transformers_files(tmp_path):
    from _tiny_encoder import make_tiny_encoder

    bare = make_tiny_encoder(tmp_path / "bare", "bert", pooling=None)
    pkg = onnxllm.export(bare, tmp_path / "bare-pkg", verify=True)
    manifest = json.loads((pkg / "onnxllm.json").read_text())
    assert manifest["embedding"]["pooling"] == "mean" and manifest["embedding"]["normalize"] is False
    assert manifest["source"]["pooling_from"] == "default"
    limited = make_tiny_encoder(tmp_path / "limited", "bert", pooling="cls", max_seq_length=16)
    pkg = onnxllm.export(limited, tmp_path / "limited-pkg")
    assert json.loads((pkg / "onnxllm.json").read_text())["embedding"]["max_tokens"] == 16
    assert onnxllm.load(pkg).embed([LONG]).token_counts == (16,)
    with pytest.raises(UnsupportedModelError, match="pooling_mode_max_tokens pooling is not supported"):
        onnxllm.export(make_tiny_encoder(tmp_path / "max", "bert", pooling="max"), tmp_path / "max-pkg")
    with pytest.raises(UnsupportedModelError, match="modules Dense"):
        onnxllm.export(make_tiny_encoder(tmp_path / "dense", "bert", extra_modules=("Dense",)), tmp_path / "d-pkg")
    assert not (tmp_path / "max-pkg").exists() and not (tmp_path / "d-pkg").exists()


def test_int8_variant_keeps_the_vectors(encoders, tmp_path):
    from onnxllm.api import quantize

    pkg = tmp_path / "pkg"
    shutil.copytree(encoders("bert")[1], pkg)
    fp32 = onnxllm.load(pkg).embed(TEXTS)
    result = quantize(pkg, "int8")
    assert result.meets_targets and result.default_for == ("cpu",) and result.min_cosine >= 0.99
    manifest = json.loads((pkg / "onnxllm.json").read_text())
    method = manifest["variants"]["int8"]["method"]
    assert method["quantized"] == {"QAttention": 2, "MatMulInteger": 4,
                                   "QEmbedLayerNormalization": 1} and method["smoothed"] == 4
    assert len(method["kept_fp32"]) == 2  # each layer's FFN output product
    model = onnxllm.load(pkg)
    assert model.variant == "int8"
    cos = np.sum(model.embed(TEXTS) * fp32, axis=1)
    assert cos.min() >= 0.99
    with pytest.raises(QuantizeError, match="already has an int8 variant"):
        quantize(pkg, "int8")
    with pytest.raises(QuantizeError, match="int8 only"):
        quantize(pkg, "int4")


def test_manifest_kind_is_validated(encoders, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(encoders("bert")[1], pkg)
    manifest = json.loads((pkg / "onnxllm.json").read_text())
    for bad, message in (({"kind": "vision"}, "'kind' must be"), ({"embedding": {**manifest["embedding"],
                                                                                   "pooling": "max"}}, "pooling 'max'"),
                         ({"embedding": None}, "expected an object")):
        (pkg / "onnxllm.json").write_text(json.dumps({**manifest, **bad}))
        with pytest.raises(InvalidPackageError, match=message):
            onnxllm.load(pkg)


def _cli(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "onnxllm.cli", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_cli_embed_and_search(encoders, tmp_path):
    pkg = encoders("bert")[1]
    model = onnxllm.load(pkg)
    proc = _cli("embed", str(pkg), "hello", "The cat sat on the mat.", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["dimension"] == 64 and data["truncated"] == [] and len(data["embeddings"]) == 2
    np.testing.assert_allclose(data["embeddings"], model.embed(["hello", "The cat sat on the mat."]), atol=1e-6)
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n\n" + LONG + "\n", encoding="utf-8")
    proc = _cli("embed", str(pkg), "--file", str(texts))
    assert proc.returncode == 0, proc.stderr
    rows = [list(map(float, line.split())) for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 2 and len(rows[0]) == 64
    np.testing.assert_allclose(rows[0], model.embed(["hello"])[0], atol=1e-5)
    assert "truncated to 64 tokens: text(s) 1" in proc.stderr
    proc = _cli("embed", str(pkg), "--no-truncate", "--file", str(texts))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "longer than the model's limit" in proc.stderr
    proc = _cli("embed", str(pkg), stdin="one\ntwo\n")
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 2
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    proc = _cli("search", str(pkg), "What is the capital of France?", "--corpus", str(corpus), "--top-k", "2",
                "--json")
    assert proc.returncode == 0, proc.stderr
    hits = json.loads(proc.stdout)
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["text"] == "What is the capital of France?"
    proc = _cli("search", str(pkg), "What is the capital of France?", "--corpus", str(corpus))
    assert proc.returncode == 0 and proc.stdout.splitlines()[0].startswith(" 1. 1.0000  What is the capital")


def test_cli_bad_input_is_one_line(encoders, tmp_path, package):
    pkg = encoders("bert")[1]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    for args in (("embed", str(pkg), ""), ("embed", str(pkg), "--file", str(empty)),
                 ("search", str(pkg), "q", "--corpus", str(empty)), ("embed", str(package("llama")), "hello"),
                 ("run", str(pkg), "hello"), ("bench", str(pkg)), ("eval", str(pkg))):
        proc = _cli(*args, stdin="")
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (args, proc.stderr)


def test_decoder_embedding_model_pools_the_last_token(tmp_path):
    """A decoder family with sentence-transformers files asking for last-token pooling exports as embeddings."""
    import torch
    from _tiny import make_tiny_checkpoint
    from transformers import AutoModel, AutoTokenizer

    folder = make_tiny_checkpoint(tmp_path, "llama")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    model = onnxllm.load(onnxllm.export(folder, tmp_path / "pkg"))
    assert model.manifest.embedding.pooling == "lasttoken" and model.manifest.embedding.normalize
    got = model.embed(TEXTS)
    tok = AutoTokenizer.from_pretrained(str(folder))
    torch_model = AutoModel.from_pretrained(str(folder)).eval()
    for i, text in enumerate(TEXTS):  # one at a time: no padding in the reference
        ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]])
        with torch.no_grad():
            last = torch_model(input_ids=ids).last_hidden_state[0, -1]
        np.testing.assert_allclose(got[i], torch.nn.functional.normalize(last, dim=0).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.embed(TEXTS, batch_size=1), got, atol=1e-6, rtol=0)
