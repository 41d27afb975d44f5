"""The fidelity corpus and its routes (quantize/fidelity.py): what `eval` and the quantizer's gate score."""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")

from _helpers import cli

from onnxllm.api import quantize
from onnxllm.errors import QuantizeError
from onnxllm.package import read_manifest
from onnxllm.quantize import fidelity, quality
from onnxllm.quantize.fidelity import (
    CORPUS_DIR,
    DRAFT_WIDTH,
    KINDS,
    PATHS,
    corpus,
    greedy_prompts,
    load_reference,
    open_variant,
    parse_transcripts,
    route_logits,
)

Q = importlib.import_module("onnxllm.quantize.quantize")
IDS = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104, 101, 32, 113, 117, 105, 99, 107]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_packages):
    pkg = tmp_path_factory.mktemp("fidelity") / "pkg"
    shutil.copytree(tiny_packages("llama"), pkg)
    quantize(pkg, "int8", evaluate=False)
    return pkg


def test_corpus_holds_every_kind_and_says_where_it_comes_from():
    passages = corpus()
    assert {p.kind for p in passages} == set(KINDS)
    chats = [p for p in passages if p.kind == "chat"]
    assert len(chats) >= 2 and all(m["role"] in ("system", "user", "assistant") for p in chats for m in p.messages)
    assert all(p.text.strip() for p in passages if p.kind != "chat")
    sources = (CORPUS_DIR / "SOURCES.md").read_text(encoding="utf-8")
    assert all(f"{kind}.txt" in sources for kind in KINDS) and "prompts.txt" in sources
    assert len(greedy_prompts()) >= 8


def test_transcripts_parse_turns_and_refuse_stray_text():
    text = "system: Be brief.\nuser: Two\nlines.\nassistant: Yes.\n---\nuser: Again?\nassistant: No."
    assert parse_transcripts(text) == [
        ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two\nlines."},
         {"role": "assistant", "content": "Yes."}),
        ({"role": "user", "content": "Again?"}, {"role": "assistant", "content": "No."}),
    ]
    with pytest.raises(QuantizeError, match="before any 'user:' turn"):
        parse_transcripts("hello\nuser: hi")


def _logp(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _plain_rows(onnx_path, manifest, ids, width):
    """Logits fed `width` tokens per pass with a numpy past, through a plain onnxruntime session (no IO
    binding, no onnxllm code): what each route must equal."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    io, arch = manifest.io, manifest.architecture
    outputs = [o.name for o in session.get_outputs()]
    empty = np.zeros((1, arch.num_kv_heads, 0, arch.head_dim), np.float32)
    past = {i.name: empty for i in session.get_inputs() if i.name.startswith("past_key_values")}
    rows = []
    for start in range(0, len(ids), width):
        chunk = ids[start:start + width]
        end = start + len(chunk)
        feed = {io.input_ids: np.asarray([chunk], np.int64), io.attention_mask: np.ones((1, end), np.int64),
                io.position_ids: np.arange(start, end, dtype=np.int64)[None], **past}
        result = dict(zip(outputs, session.run(outputs, feed)))
        rows.append(result[io.logits][0])
        past = {}
        for i in range(arch.num_layers):
            past[io.past_key.format(i)] = result[io.present_key.format(i)]
            past[io.past_value.format(i)] = result[io.present_value.format(i)]
    return np.concatenate(rows)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_each_route_feeds_what_it_says(quantized, variant):
    manifest = read_manifest(quantized)
    path = quantized / manifest.variants[variant].file
    session = open_variant(path, manifest)
    widths = {"prefill": len(IDS), "decode": 1, "draft": DRAFT_WIDTH}
    for route in PATHS:
        got = route_logits(session, IDS, route)
        assert got.shape == (len(IDS), manifest.architecture.vocab_size)
        want = _plain_rows(path, manifest, IDS, widths[route])
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    with pytest.raises(QuantizeError, match="unknown path"):
        route_logits(session, IDS, "sideways")


def test_report_figures_come_from_the_routes(quantized):
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    report = quality.evaluate(quantized, "int8", text=text, max_tokens=40, greedy_tokens=4, save=False)
    assert report.text == "custom" and set(report.paths) == set(PATHS) and report.greedy_prompts == 1
    manifest = read_manifest(quantized)
    ids = load_reference(quantized, "fp32").encode(text)[:40]
    ref = _plain_rows(quantized / manifest.variants["fp32"].file, manifest, ids, 64)
    lr = _logp(ref)
    for route, width in (("prefill", 64), ("decode", 1), ("draft", DRAFT_WIDTH)):
        lv = _logp(_plain_rows(quantized / manifest.variants["int8"].file, manifest, ids, width))
        figures = report.paths[route]
        assert figures["tokens"] == len(ids)
        assert figures["kl_divergence"] == pytest.approx((np.exp(lr) * (lr - lv)).sum(-1).mean(), abs=2e-6)
        assert figures["top1_agreement"] == pytest.approx((lv.argmax(-1) == lr.argmax(-1)).mean(), abs=1e-5)
        nll = -lv[np.arange(len(ids) - 1), ids[1:]]
        assert figures["perplexity"] == pytest.approx(np.exp(nll.mean()), rel=1e-4)
    # The headline is the worst route's.
    assert report.top1_agreement == min(p["top1_agreement"] for p in report.paths.values())
    assert report.kl_divergence == max(p["kl_divergence"] for p in report.paths.values())
    assert report.perplexity == max(p["perplexity"] for p in report.paths.values())


def test_corpus_report_scores_every_kind_and_prompt(quantized):
    report = quality.evaluate(quantized, "int8", max_tokens=700, greedy_tokens=3)
    assert report.text == "corpus" and report.tokens >= 650
    for route in PATHS:
        assert set(report.paths[route]["by_kind"]) == set(KINDS)
    assert report.greedy_prompts == len(greedy_prompts()) and 0 < report.greedy_tokens <= 3 * report.greedy_prompts
    saved = json.loads((quantized / "quality.json").read_text())["int8"]
    assert saved["paths"]["decode"]["by_kind"]["code"]["tokens"] > 0 and saved["greedy_prompts"] == 8
    text = quality.format_report(report)
    assert "fidelity corpus" in text and all(f"  {route}" in text for route in PATHS)
    info = cli("info", quantized)  # what `onnxllm info` shows of it
    assert info.returncode == 0, info.stderr
    assert "of the fidelity corpus" in info.stdout and all(f" {route} " in info.stdout for route in PATHS)
    itself = quality.evaluate(quantized, "fp32", max_tokens=300, greedy_tokens=4, save=False)
    assert itself.top1_agreement == 1.0 and itself.kl_divergence < 1e-6
    assert itself.greedy_agreement == itself.greedy_tokens


@pytest.mark.filterwarnings("ignore:the int8 variant misses its targets")
def test_gate_scores_the_corpus_and_checks_kl(package, monkeypatch):
    pkg = package("llama")
    result = quantize(pkg, "int8", eval_tokens=300)
    assert set(result.quality.paths) == set(PATHS) and result.quality.text == "corpus"
    assert result.method.targets.max_kl == 0.01 and result.quality.tokens >= 250
    # A KL above the scheme's target alone is enough to miss, whatever top-1 and perplexity say.
    real = Q.score_file
    monkeypatch.setattr(Q, "score_file", lambda *a, **k: dataclasses.replace(
        real(*a, **k), kl_divergence=0.02, top1_agreement=1.0, perplexity_change=0.0))
    monkeypatch.setattr(Q, "_size_target", lambda *a: 1.0)  # tiny models miss the size target (rotary tables)
    result = quantize(pkg, "int8", eval_tokens=100, force=True)
    assert result.meets_targets is False and "KL 0.0200" in " ".join(result.warnings)


@pytest.mark.filterwarnings("ignore:the int4 variant is far from fp32", "ignore:the int8-dynamic variant misses")
def test_gate_samples_the_slow_routes_only_where_they_round_alike(quantized, package, monkeypatch):
    """MatMulNBits quantizes each token on its own, so the gate scores decode and draft passes on a sample,
    checked against prefill on the same tokens; DynamicQuantizeMatMul shares a scale across a pass's tokens,
    so int8-dynamic's routes are scored whole."""
    manifest = read_manifest(quantized)
    assert fidelity.routes_round_alike(quantized / manifest.variants["int8"].file)
    report = quality.score_file(quantized, quantized / manifest.variants["int8"].file, variant_name="int8",
                                reference="fp32", max_tokens=600, greedy_tokens=2, route_tokens=120)
    full = report.paths["prefill"]["tokens"]
    assert full >= 550 and all(110 <= report.paths[r]["tokens"] <= 130 for r in ("decode", "draft"))
    assert set(report.paths["decode"]["by_kind"]) == set(KINDS)  # the sample is shared among the kinds
    # the headline comes from the whole-text route, not the sample
    assert report.top1_agreement == report.paths["prefill"]["top1_agreement"] and report.tokens == full
    info_lines = quality.format_report(report)
    assert "prefill" in info_lines

    # a route that rounds differently on the sample is scored on the whole text after all
    real = fidelity.route_logits

    def noisy(session, ids, path):
        out = real(session, ids, path)
        return out + np.random.default_rng(len(ids)).normal(0, 3.0, out.shape).astype(np.float32) \
            if path == "decode" else out

    monkeypatch.setattr(fidelity, "route_logits", noisy)
    again = quality.score_file(quantized, quantized / manifest.variants["int8"].file, variant_name="int8",
                               reference="fp32", max_tokens=600, greedy_tokens=0, route_tokens=120)
    assert again.paths["decode"]["tokens"] == again.paths["draft"]["tokens"] == full
    assert again.top1_agreement == again.paths["decode"]["top1_agreement"] < report.top1_agreement
    monkeypatch.undo()

    # what the quantizer's gate asks for: a sample for MatMulNBits graphs, the whole text for int8-dynamic
    asked = {}
    real_score = Q.score_file

    def score(*args, **kw):
        asked[kw["variant_name"]] = kw["route_tokens"]
        return real_score(*args, **{**kw, "max_tokens": 60, "greedy_tokens": 0})

    monkeypatch.setattr(Q, "score_file", score)
    pkg = package("llama")
    quantize(pkg, "int4", eval_tokens=60)
    quantize(pkg, "int8-dynamic", eval_tokens=60)
    assert asked == {"int4": fidelity.ROUTE_SAMPLE, "int8-dynamic": None}
    assert not fidelity.routes_round_alike(pkg / read_manifest(pkg).variants["int8-dynamic"].file)


@pytest.mark.real
def test_smollm2_corpus_is_long_enough(smollm2_package):
    """At least 4,096 tokens of SmolLM2's tokenizer (chat transcripts through its template)."""
    model = load_reference(smollm2_package, "fp32")
    total = 0
    for p in corpus():
        if p.messages:
            total += len(model.encode_chat([dict(m) for m in p.messages]))
        else:
            total += len(model.encode(p.text))
    assert total >= 4096


def test_int4_exact_scheme_computes_in_float32(package):
    """The layers at accuracy level 1 (float32 activations), the 8-bit lm_head alone at level 4."""
    import onnx

    pkg = package("llama")
    result = quantize(pkg, "int4-exact", evaluate=False, accuracy_level=4)  # the scheme fixes its own level
    assert result.method.accuracy_level == 1
    assert (result.method.lm_head.bits, result.method.lm_head.operator, result.method.lm_head.accuracy_level) == \
        (8, "MatMulNBits", 4)
    assert result.variant == "int4-exact" and (pkg / "onnx" / "model_q4_exact.onnx").is_file()
    graph = onnx.load(str(pkg / "onnx" / "model_q4_exact.onnx"), load_external_data=False).graph
    levels = {n.name: ({a.name: a.i for a in n.attribute}["accuracy_level"], {a.name: a.i for a in n.attribute}["bits"])
              for n in graph.node if n.op_type == "MatMulNBits"}
    heads = {k: v for k, v in levels.items() if "lm_head" in k}
    assert list(heads.values()) == [(4, 8)] and set(v for k, v in levels.items() if k not in heads) == {(1, 4)}
    assert read_manifest(pkg).variants["int4-exact"].method.lm_head.accuracy_level == 4  # recorded, read back
    report = quality.evaluate(pkg, "int4-exact", max_tokens=200, greedy_tokens=2, save=False)
    assert report.top1_agreement > 0.5  # a tiny random model re-quantized (no GGUF): RTN int4, not exact


@pytest.mark.real
def test_smollm2_int4_exact_keeps_fp32_answers(smollm2_package, tmp_path):
    """The GGUF's Q4_1/Q8_0 blocks with float32 arithmetic in the layers: fp32's model up to the lm_head's
    int8 activations (measured top-1 98.6%, KL 0.0007 on the corpus), within int8's targets (~2 min)."""
    pkg = tmp_path / "smollm2"
    shutil.copytree(smollm2_package, pkg)
    result = quantize(pkg, "int4-exact")
    assert result.method.lossless is True and result.meets_targets
    assert result.quality.top1_agreement >= 0.97 and result.quality.kl_divergence <= 0.01
    assert read_manifest(pkg).default_variant["cpu"] == "int4-exact"
