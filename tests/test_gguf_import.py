"""GGUF import: every tensor type read exactly, K-quant files exported and imported losslessly, bad files refused.

The GGUFs are written here with gguf's GGUFWriter from random valid blocks (tests/_gguf.py): the
model is random, but its weights are exactly the blocks, so "lossless" is checked bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from _gguf import random_blocks, write_tiny_llama
from click.testing import CliRunner

from onnxllm.cli import cli
from onnxllm.errors import InvalidPackageError, UnsupportedModelError
from onnxllm.exporter.export import ExportOptions, export
from onnxllm.exporter.gguf_model import READABLE_TYPES, check_gguf_file
from onnxllm.package import read_manifest
from onnxllm.api import quantize
from onnxllm.quantize.gguf_blocks import FORMATS, decode_blocks, native_bits
from onnxllm.quantize.quality import DecoderRunner

QUANT_TYPES = list(FORMATS)
IDS = [int(i) for i in np.random.default_rng(0).integers(0, 300, 24)]
# Q4_K_M's pattern: Q4_K for most matrices, Q6_K for attn_v / ffn_down and the (tied) embedding.
Q4_K_M = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
          "ffn_up": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q6_K"}
# Every other type somewhere: layer 0 and 1 differ; an untied Q5_K output; a Q4_K embedding (offsets).
EVERY_TYPE = {"blk.0.attn_q": "Q5_K", "blk.0.attn_k": "Q3_K", "blk.0.attn_v": "Q2_K", "blk.0.attn_output": "Q5_0",
              "blk.0.ffn_gate": "Q5_1", "blk.0.ffn_up": "Q4_0", "blk.0.ffn_down": "Q4_1",
              "blk.1.attn_q": "Q8_0", "blk.1.attn_k": "Q8_0", "blk.1.attn_v": "Q8_0", "blk.1.attn_output": "BF16",
              "blk.1.ffn_gate": "F16", "blk.1.ffn_up": "F16", "blk.1.ffn_down": "Q6_K",
              "token_embd": "Q4_K", "output": "Q5_K"}


def logits(pkg: Path, variant: str, ids=IDS) -> np.ndarray:
    m = read_manifest(pkg)
    return DecoderRunner(pkg / m.variants[variant].file, m).logits(ids)


# --------------------------------------------------------------------------- blocks, bit for bit


@pytest.mark.parametrize("kind", QUANT_TYPES)
def test_every_block_type_imports_bit_exactly(kind):
    """Random valid blocks of each type: the MatMulNBits form dequantizes to gguf's own numbers exactly,
    at the type's own width and (every type fits) at 8 bits."""
    rng = np.random.default_rng(QUANT_TYPES.index(kind))
    raw = random_blocks(kind, 12, 512, rng)
    reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    for bits in sorted({native_bits(kind), 8}):
        bw = decode_blocks(kind, raw, 12, bits)
        assert bw.bits == bits and bw.block_size == FORMATS[kind][2] and bw.shape == (12, 512)
        assert np.array_equal(bw.dequantize(), reference), (kind, bits)
    assert native_bits(kind) == (4 if kind in ("Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K") else 8)
    if native_bits(kind) == 8:
        with pytest.raises(ValueError, match="this weight is planned at 4"):
            decode_blocks(kind, raw, 12, 4)


# --------------------------------------------------------------------------- whole files


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (gguf path, exported package), made once per module."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str, types: dict, **kwargs) -> tuple[Path, Path]:
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            path = write_tiny_llama(root / f"{name}.gguf", types, **kwargs)
            made[name] = path, export(path, root / "pkg", options=ExportOptions())
        return made[name]

    return get


def _copy(pkg: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(pkg, dst)
    return dst


def test_q4_k_m_file_imports_at_its_own_precision(exported, tmp_path):
    path, pkg = exported("q4km", Q4_K_M)
    pkg = _copy(pkg, tmp_path)
    source = read_manifest(pkg).source
    assert source["tensor_types"] == {"F32": 5, "Q4_K": 10, "Q6_K": 5}
    result = quantize(pkg, "gguf", accuracy_level=1, eval_tokens=64)
    g = result.method.gguf
    assert result.method.lossless is True and g["requantized"] == 0
    # q|k (Q4_K) and v (Q6_K) stay two weights of their own widths; gate|up fuse; the tied table is Q6_K.
    assert g["types"] == {"Q4_K": 4, "Q4_K+Q6_K": 2, "Q6_K": 4}
    assert result.quality.top1_agreement >= 0.995 and result.meets_targets
    import onnx

    graph = onnx.load(str(pkg / "onnx/model_gguf.onnx"), load_external_data=False).graph
    nbits = {n.name: {a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"}
    assert nbits["/model/layers.0/attn/qkv_proj/MatMul/part0_Q4"]["block_size"] == 32  # q|k, Q4_K
    assert nbits["/model/layers.0/attn/qkv_proj/MatMul/part1_Q8"]["block_size"] == 16  # v: Q6_K sub-blocks of 16
    np.testing.assert_allclose(logits(pkg, "gguf"), logits(pkg, "fp32"), atol=2e-4)
    # info: the file's mix and the variant's size and import.
    out = CliRunner().invoke(cli, ["info", str(pkg)])
    assert out.exit_code == 0, out.output
    assert "F32 5, Q4_K 10, Q6_K 5 tensors" in out.output
    assert "GGUF blocks imported exactly, every weight: Q4_K 4, Q4_K+Q6_K 2, Q6_K 4" in out.output
    size = read_manifest(pkg).variants["gguf"].bytes
    assert f"{size / 2**20:.1f} MiB  onnx/model_gguf.onnx" in out.output

    # int4: the Q4_K weights come in exactly at 4 bits, the Q6_K table at the lm_head's 8; the weights
    # holding Q6_K rows (qkv, down) are re-quantized to 4 bits, and it says why.
    int4 = quantize(pkg, "int4", evaluate=False)
    assert int4.method.lossless is False and int4.method.gguf["types"] == {"Q4_K": 4, "Q6_K": 2}
    assert "GGUF Q6_K is 8-bit, this weight is planned at 4" in next(iter(int4.method.gguf["requantized_because"]))


def test_every_type_in_one_file(exported, tmp_path):
    """Q2_K..Q8_0 imported exactly (Q4_K embedding with its offsets, untied Q5_K lm_head), F16/BF16 kept float."""
    _, pkg = exported("every", EVERY_TYPE, tied=False)
    pkg = _copy(pkg, tmp_path)
    result = quantize(pkg, "gguf", evaluate=False, accuracy_level=0)
    g = result.method.gguf
    assert result.method.lossless is True and g["kept_float"] == 2  # blk.1 o_proj (BF16), gate|up (F16)
    assert g["types"]["Q4_K"] == 1 and g["types"]["Q5_K"] == 1  # the embedding and the lm_head
    assert set("+".join(g["types"]).split("+")) == set(QUANT_TYPES)
    np.testing.assert_allclose(logits(pkg, "gguf"), logits(pkg, "fp32"), atol=2e-4)


def test_export_reads_the_weights_exactly(exported):
    """The fp32 graph holds gguf.quants.dequantize of each tensor, llama.cpp's q/k row order undone."""
    import onnx
    from onnx import numpy_helper

    path, pkg = exported("every", EVERY_TYPE, tied=False)
    inits = {t.name: t for t in onnx.load(str(pkg / "onnx/model.onnx")).graph.initializer}
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}

    def deq(name):
        t = tensors[name]
        return gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(t.tensor_type)).reshape(
            tuple(int(n) for n in reversed(t.shape)))

    def unpermute(w, heads):
        return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

    qkv = numpy_helper.to_array(inits["/model/layers.0/attn/qkv_proj.weight"]).T
    expected = np.concatenate([unpermute(deq("blk.0.attn_q.weight"), 4), unpermute(deq("blk.0.attn_k.weight"), 2),
                               deq("blk.0.attn_v.weight")])
    assert np.array_equal(qkv, expected)
    o = numpy_helper.to_array(inits["/model/layers.1/attn/o_proj.weight"]).T  # BF16
    assert np.array_equal(o, deq("blk.1.attn_output.weight"))
    assert np.array_equal(numpy_helper.to_array(inits["model.embed_tokens.weight"]), deq("token_embd.weight"))
    manifest = read_manifest(pkg)
    assert manifest.architecture.head_dim == 64 and manifest.architecture.context_length == 256
    config = json.loads((pkg / "config.json").read_text())
    assert config["rope_theta" if "rope_theta" in config else "rope_parameters"] in (50000.0, {
        "rope_theta": 50000.0, "rope_type": "default"})


# HF name (after model.layers.N.) -> llama.cpp's, per family (convert_hf_to_gguf's tensor map).
_HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_SANDWICH = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm"}


def _write_like_convert_hf_to_gguf(ckpt: Path, path: Path, model_type: str) -> None:
    """An F32 GGUF of an HF checkpoint, as llama.cpp's converter writes it: llama's q/k rows permuted,
    gemma's norms stored as 1 + w, the family's metadata keys."""
    from _gguf import _byte_level_vocab
    from safetensors.numpy import load_file

    config = json.loads((ckpt / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch=model_type)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    if config.get("head_dim"):
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    if model_type == "gemma2":
        w.add_float32("gemma2.attn_logit_softcapping", config["attn_logit_softcapping"])
        w.add_float32("gemma2.final_logit_softcapping", config["final_logit_softcapping"])
        w.add_sliding_window(config["sliding_window"])
    tokens, types, merges = _byte_level_vocab(320)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(256)
    names = {**_HF_TO_GGUF, **(_SANDWICH if model_type == "gemma2" else {})}

    def permute(x, n):
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for key, value in load_file(str(ckpt / "model.safetensors")).items():
        value = value.astype(np.float32)
        if model_type.startswith("gemma") and key.endswith("norm.weight"):
            value = value + np.float32(1.0)
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            layer, rest = key.split(".")[2], ".".join(key.split(".")[3:-1])
            if model_type == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):
                value = permute(value, heads if rest == "self_attn.q_proj" else kv)
            name = f"blk.{layer}.{names[rest]}.{key.rsplit('.', 1)[1]}"
        w.add_tensor(name, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {"rope_theta": 12345.0, "rms_norm_eps": 1e-6}),  # q/k rows permuted, RoPE base, eps from metadata
    ("qwen2", {}),  # q/k/v biases
    ("qwen3", {}),  # per-head q/k norms, head_dim from key_length
    # query_pre_attn_scalar = head_dim, as in Gemma 2 2B/9B (the GGUF has no key for it; llama.cpp's rule)
    ("gemma2", {"attn_logit_softcapping": 30.0, "final_logit_softcapping": 20.0, "sliding_window": 8,
                "query_pre_attn_scalar": 16}),
])
def test_gguf_of_an_hf_checkpoint_exports_the_same_model(tmp_path, model_type, overrides):
    """A tiny HF model written as an F32 GGUF the way convert_hf_to_gguf does: both exports give the
    same logits (on a prompt longer than gemma2's window), so every hyperparameter and row order is read right."""
    from _tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path, model_type, **overrides)
    _write_like_convert_hf_to_gguf(ckpt, tmp_path / "m.gguf", model_type)
    from_hf = export(ckpt, tmp_path / "hf", options=ExportOptions(verify=False))
    from_gguf = export(tmp_path / "m.gguf", tmp_path / "gg", options=ExportOptions(verify=False))
    assert read_manifest(from_gguf).architecture.model_type == model_type
    np.testing.assert_allclose(logits(from_gguf, "fp32"), logits(from_hf, "fp32"), atol=1e-4)


# --------------------------------------------------------------------------- bad files: one line, nothing written


def _truncated(tmp_path: Path) -> Path:
    path = write_tiny_llama(tmp_path / "full.gguf", Q4_K_M, layers=1)
    data = path.read_bytes()
    (tmp_path / "bad.gguf").write_bytes(data[: len(data) // 2])
    return tmp_path / "bad.gguf"


def _wrong_magic(tmp_path: Path) -> Path:
    path = write_tiny_llama(tmp_path / "full.gguf", Q4_K_M, layers=1)
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + path.read_bytes()[4:])
    return tmp_path / "bad.gguf"


def _iq_type(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "bad.gguf", {**Q4_K_M, "blk.0.attn_q": "IQ4_XS"}, layers=1)


BAD = {
    "truncated": (_truncated, "is not a valid GGUF file"),
    "wrong magic": (_wrong_magic, "is not a valid GGUF file"),
    "IQ type": (_iq_type, "tensor blk.0.attn_q.weight has GGUF type IQ4_XS"),
    "architecture": (lambda p: write_tiny_llama(p / "bad.gguf", Q4_K_M, layers=1, arch="mamba"),
                     "GGUF architecture 'mamba' is not supported"),
    "missing key": (lambda p: write_tiny_llama(p / "bad.gguf", Q4_K_M, layers=1, skip_keys=("block_count",)),
                    "metadata key llama.block_count is missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_gguf_is_one_line_error_and_writes_nothing(case, tmp_path):
    make, message = BAD[case]
    path = make(tmp_path)
    with pytest.raises((InvalidPackageError, UnsupportedModelError), match=message):
        check_gguf_file(path)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(path), "-o", str(out)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_readable_types_are_the_issue_list():
    assert set(READABLE_TYPES) == {"F32", "F16", "BF16", *QUANT_TYPES}


# --------------------------------------------------------------------------- SmolLM2 requantized by llama.cpp

REQUANTIZED = Path(os.environ.get("ONNXLLM_GGUF_DIR", Path.home() / ".cache" / "onnxllm" / "requantized"))


@pytest.mark.real
@pytest.mark.parametrize("kind", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"])
def test_smollm2_requantized_imports_losslessly(kind, tmp_path):
    """The files scripts/make_gguf_fixtures.py makes with llama.cpp's quantizer: each exports, its gguf
    variant is the file's model (top-1 >= 99.5% vs its own fp32 at accuracy level 1), and it knows Paris."""
    path = REQUANTIZED / f"SmolLM2-135M-Instruct.{kind}.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing: python scripts/make_gguf_fixtures.py makes it (needs the llama-cpp-python "
                    "peer venv from bash benchmarks/setup_peers.sh llamacpp); set ONNXLLM_GGUF_DIR to look elsewhere")
    import onnxllm

    pkg = export(path, tmp_path / "pkg", options=ExportOptions())
    result = quantize(pkg, "gguf", accuracy_level=1, eval_tokens=256)
    assert result.method.lossless is True and result.method.gguf["requantized"] == 0
    assert result.quality.top1_agreement >= 0.995
    model = onnxllm.load(pkg, variant="gguf")
    answer = model.generate("The capital of France is", max_tokens=8, chat=False)
    assert "Paris" in answer.text


def test_export_and_quantize_parse_the_file_once(tmp_path, monkeypatch):
    """The source check, the tokenizer, the weights, the manifest and the quantizer's block import share one
    parsed reader (parsing a real vocabulary costs seconds); a changed file is parsed again."""
    from onnxllm.exporter import gguf_model

    gguf_model._parsed.cache_clear()
    parsed = []
    real = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parsed.append(a[0]) or real(*a, **k))
    path = write_tiny_llama(tmp_path / "m.gguf", {"attn_q": "Q4_0"})
    pkg = export(path, tmp_path / "pkg", options=ExportOptions(verify=False))
    quantize(pkg, "gguf", evaluate=False)
    assert len(parsed) == 1
    assert "Q4_0" in check_gguf_file(path) and len(parsed) == 1
    write_tiny_llama(path, {"attn_q": "Q8_0"}, seed=1)  # rewritten in place: read afresh
    types = check_gguf_file(path)
    assert "Q8_0" in types and "Q4_0" not in types and len(parsed) == 2
