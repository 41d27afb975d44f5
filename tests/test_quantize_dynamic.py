"""The int8-dynamic scheme: smoothing folded into the graph, then DynamicQuantizeMatMul (quantize/dynamic.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _helpers import IDS, TOLERANCE, logits, rel_rms

from onnxllm.package import read_manifest
from onnxllm.api import quantize
from onnxllm.quantize.dynamic import smooth_and_convert
from onnxllm.quantize.quality import DecoderRunner


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])  # RMS norms; qkv bias; LayerNorm + bias
def test_int8_dynamic_smooths_exactly_and_stays_close(package, model_type):
    pkg = package(model_type)
    arch = read_manifest(pkg).architecture
    result = quantize(pkg, "int8-dynamic", evaluate=False)

    manifest = read_manifest(pkg)
    path = pkg / manifest.variants["int8-dynamic"].file
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 3 * arch.num_layers  # qkv, o_proj, gate|up per layer
    assert ops.count("MatMulNBits") == arch.num_layers + 1  # down_proj per layer, lm_head
    assert result.method.dynamic["converted"] == 3 * arch.num_layers
    assert result.method.operator == "com.microsoft.DynamicQuantizeMatMul + MatMulNBits"
    # Smoothing only moves scale between factors; with int8 rounding the logits stay as close as int8's.
    assert rel_rms(logits(pkg, "fp32", IDS), logits(pkg, "int8-dynamic", IDS)) < TOLERANCE["int8"] * 2


def test_int8_dynamic_smoothing_alone_is_exact(package, tmp_path):
    # The folding (1/s into norms and V columns, s into the weights) must compute the same function:
    # only the int8 rounding after it may move the logits.
    for model_type in ("llama", "gpt2"):
        pkg = package(model_type)
        m = read_manifest(pkg)
        model = onnx.load(str(pkg / m.variants["fp32"].file))
        done = smooth_and_convert(model, m, IDS[:16], convert=False)
        assert done["converted"] == 3 * m.architecture.num_layers
        smoothed = tmp_path / f"{model_type}-smoothed.onnx"
        onnx.save(model, str(smoothed))
        np.testing.assert_allclose(DecoderRunner(smoothed, m).logits(IDS), logits(pkg, "fp32", IDS),
                                   rtol=1e-3, atol=1e-4)


def test_probe_session_reads_the_weights_from_a_file_and_leaves_the_model_alone(package):
    """The calibration probe hands ONNX Runtime a graph file with its weights in a data file beside it (a
    protobuf cannot hold a 1B float32 model), made without copying or touching `model`'s tensors."""
    from onnxllm.decoder_io import DecoderIO
    from onnxllm.quantize.dynamic import probe_session

    pkg = package("llama")
    manifest = read_manifest(pkg)
    model = onnx.load(str(pkg / manifest.variants["fp32"].file))
    before = model.SerializeToString()
    tensors = list(model.graph.initializer)
    name = next(n.output[0] for n in model.graph.node if n.op_type == "MatMul")
    session = probe_session(model, [name])
    assert model.SerializeToString() == before
    assert all(a is b for a, b in zip(tensors, model.graph.initializer))  # the same objects, not copies
    io = DecoderIO.from_manifest(manifest)
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, io.feed(IDS))))
    assert outs[name].shape[:2] == (1, len(IDS))
    np.testing.assert_allclose(outs[io.names.logits][0], logits(pkg, "fp32", IDS), atol=1e-4, rtol=1e-4)
