"""Exporter: every architecture matches PyTorch, the package is complete, failures leave nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from _tiny import make_tiny_checkpoint

from onnxllm.decoder_io import DecoderIO
from onnxllm.errors import ExportError, InvalidPackageError, ModelNotFoundError, OfflineError, UnsupportedModelError
from onnxllm.exporter.export import ExportOptions, export
from onnxllm.exporter.verify import VerifyReport
from onnxllm.package import read_manifest

ARCHS = ["gpt2", "llama", "mistral", "qwen2", "phi3", "gemma"]
PACKAGE_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "onnx/model.onnx", "onnx/model.onnx.data", "genai_config.json",
                 "onnxllm.json"]


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_matches_pytorch(tmp_path, arch):
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    ckpt = make_tiny_checkpoint(tmp_path, arch)
    pkg = export(ckpt, tmp_path / "pkg")
    for name in PACKAGE_FILES:
        assert (pkg / name).is_file(), name
    assert pkg.stat().st_mode & 0o777 == tmp_path.stat().st_mode & 0o777  # not mkdtemp's owner-only mode
    graph = pkg / "onnx" / "model.onnx"
    assert graph.with_name("model.onnx.data").stat().st_mode == graph.stat().st_mode
    manifest = json.loads((pkg / "onnxllm.json").read_text())
    assert manifest["architecture"]["model_type"] == arch
    assert manifest["verification"]["max_abs_diff"] < 1e-4

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    sess = ort.InferenceSession(str(pkg / "onnx/model.onnx"), providers=["CPUExecutionProvider"])
    io = DecoderIO.from_manifest(read_manifest(pkg))
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 10)).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(io.run(sess, io.feed(ids)).logits, ref, atol=1e-4)  # without past
    first = io.run(sess, io.feed(ids[:, :6]))
    rest = io.run(sess, io.feed(ids[:, 6:], start=6, past=first.present))
    np.testing.assert_allclose(rest.logits, ref[:, 6:], atol=1e-4)  # with past

    # 20 greedy tokens through onnxllm's runtime (KV cache) equal transformers' generate.
    import onnxllm

    prompt = [5, 66, 70, 101, 32]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    m = onnxllm.load(pkg)
    m.manifest.eos_token_ids.clear()  # compare all 20 tokens, as HF did with eos_token_id=None
    session_tokens = []
    from onnxllm.runtime.generate import GenerationConfig, generate_tokens

    for ev in generate_tokens(m.session, prompt, GenerationConfig(max_tokens=20)):
        if ev.token is not None:
            session_tokens.append(ev.token)
    assert session_tokens == hf


def test_existing_package_needs_force(tiny_llama, tmp_path):
    before = (tiny_llama / "onnxllm.json").read_bytes()
    with pytest.raises(InvalidPackageError, match="--force"):
        export(tiny_llama, tiny_llama)
    assert (tiny_llama / "onnxllm.json").read_bytes() == before


def test_failed_verification_leaves_no_package(tmp_path, monkeypatch):
    ckpt = make_tiny_checkpoint(tmp_path, "llama")
    import onnxllm.exporter.export as ex

    monkeypatch.setattr(ex, "verify_export", lambda *a, **k: VerifyReport(1.0, 1.0, 1e-3, 1))
    with pytest.raises(ExportError, match="verification failed"):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_failed_force_export_keeps_old_package(tiny_gpt2, tmp_path, monkeypatch):
    """--force over an existing package: the old one survives a failure untouched."""
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_gpt2, pkg)
    snapshot = {p.relative_to(pkg): p.read_bytes() for p in pkg.rglob("*") if p.is_file()}
    ckpt = make_tiny_checkpoint(tmp_path, "llama")
    import onnxllm.exporter.export as ex

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "verify_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(ckpt, pkg, options=ExportOptions(force=True))
    assert {p.relative_to(pkg): p.read_bytes() for p in pkg.rglob("*") if p.is_file()} == snapshot
    assert {p.name for p in tmp_path.iterdir()} == {"pkg", ckpt.name}  # no staging folder left


def test_disk_full_during_save_leaves_nothing(tmp_path, monkeypatch):
    ckpt = make_tiny_checkpoint(tmp_path, "llama")
    import onnxllm.exporter.export as ex

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "_save_onnx", full)
    with pytest.raises(OSError):
        export(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]


def test_unwritable_output_folder(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path, "llama")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(InvalidPackageError, match="cannot write"):
            export(ckpt, locked / "pkg")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("case", ["missing", "no_config", "unsupported", "pickle_only", "corrupt_gguf", "not_gguf"])
def test_bad_sources(tmp_path, case):
    if case == "missing":
        source, error = tmp_path / "nope", ModelNotFoundError
    elif case == "no_config":
        (tmp_path / "ckpt").mkdir()
        source, error = tmp_path / "ckpt", ModelNotFoundError
    elif case == "unsupported":
        (tmp_path / "ckpt").mkdir()  # not bert: that exports as an embedding model now
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "whisper"}))
        source, error = tmp_path / "ckpt", UnsupportedModelError
    elif case == "pickle_only":
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (tmp_path / "ckpt" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
        source, error = tmp_path / "ckpt", UnsupportedModelError
    elif case == "corrupt_gguf":
        (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
        source, error = tmp_path / "m.gguf", InvalidPackageError
    else:
        (tmp_path / "m.bin").write_bytes(b"abc")
        source, error = tmp_path / "m.bin", UnsupportedModelError
    with pytest.raises(error) as info:
        export(source, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unsupported_message_lists_supported(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "whisper"}))  # bert exports as embeddings
    with pytest.raises(UnsupportedModelError, match="gemma.*gpt2.*llama"):
        export(tmp_path / "ckpt", tmp_path / "out")


def test_offline_hub_id_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(OfflineError, match="not reachable"):
        export("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "out")
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("args,needle", [
    (["export", "/no/such/dir", "-o", "OUT"], "does not exist"),
    (["export", "HuggingFaceTB/SmolLM2-135M-Instruct", "-o", "OUT"], "not reachable"),
])
def test_cli_bad_source_is_one_line(tmp_path, args, needle):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    proc = subprocess.run([sys.executable, "-m", "onnxllm.cli", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.real
def test_smollm2_export_verified_and_greedy(smollm2_package, reference):
    manifest = json.loads((smollm2_package / "onnxllm.json").read_text())
    assert manifest["verification"]["max_abs_diff"] < 1e-3
    assert manifest["source"]["sha256"] == reference["gguf_sha256"]
    assert manifest["eos_token_ids"] == [2]
    import onnxllm

    m = onnxllm.load(smollm2_package)
    for case in reference["greedy_fp32"]:
        result = m.generate(case["prompt"], max_tokens=32)
        expected = case["new_token_ids"]
        if expected[-1] == 2:  # the reference stops at <|im_end|>
            assert result.token_ids == expected[:-1] and result.finish_reason == "eos"
        else:
            assert result.token_ids == expected
        assert result.text == case["text"].replace("<|im_end|>", "")


def test_force_never_replaces_a_folder_that_is_not_a_package(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path, "llama")
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    with pytest.raises(InvalidPackageError, match="not an onnxllm package"):
        export(ckpt, docs, options=ExportOptions(force=True, verify=False))
    assert (docs / "thesis.txt").read_text() == "years of work"
    with pytest.raises(InvalidPackageError, match="not an onnxllm package"):
        export(ckpt, ckpt, options=ExportOptions(force=True, verify=False))  # -o pointing at the source
    assert (ckpt / "config.json").is_file()


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path, "llama")
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ExportError, match="cannot load"):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
