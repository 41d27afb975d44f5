"""Bad packages and untrusted files: each is a typed error with a one-line message, never a crash."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxllm
from onnxllm.errors import DeviceError, GenerationError, InvalidPackageError, ModelNotFoundError, OnnxLLMError
from onnxllm.package import parse_manifest, read_manifest, safe_path


@pytest.fixture
def pkg(tiny_llama, tmp_path) -> Path:
    out = tmp_path / "pkg"
    shutil.copytree(tiny_llama, out)
    return out


def _manifest(pkg: Path) -> dict:
    return json.loads((pkg / "onnxllm.json").read_text())


def _write(pkg: Path, data: dict) -> None:
    (pkg / "onnxllm.json").write_text(json.dumps(data))


def _one_line_error(exc_type, fn, match=None):
    with pytest.raises(exc_type, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_path(tmp_path):
    _one_line_error(ModelNotFoundError, lambda: onnxllm.load(tmp_path / "nothing"), "does not exist")


def test_folder_without_manifest_or_onnx(tmp_path):
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(tmp_path), "not an onnxllm package")


def test_model_onnx_without_package_files(pkg, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(pkg / "onnx" / "model.onnx", lone / "model.onnx")
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(lone / "model.onnx"), "no onnxllm.json")


def test_missing_tokenizer(pkg):
    (pkg / "tokenizer.json").unlink()
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg), "tokenizer.json")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_onnx(pkg, damage):
    path = pkg / "onnx" / "model.onnx"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 3], "garbage": os.urandom(4096), "empty": b""}[damage])
    msg = _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg), "cannot load")
    assert "re-export" in msg


def _externalize(pkg: Path) -> Path:
    import onnx

    path = pkg / "onnx" / "model.onnx"
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    return path.with_name("model.onnx.data")


def test_external_data_works_then_missing_or_truncated(pkg):
    data = _externalize(pkg)
    assert onnxllm.load(pkg).generate("the", max_tokens=3).token_ids
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg), "cannot load")
    data.unlink()
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg), "cannot load")


def test_external_data_outside_package_refused(pkg, tmp_path):
    import onnx

    data = _externalize(pkg)
    outside = tmp_path / "outside.data"
    shutil.move(data, outside)
    model = onnx.load(str(pkg / "onnx" / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../outside.data"
    (pkg / "onnx" / "model.onnx").write_bytes(model.SerializeToString())
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg), "escapes model directory")


def test_tokenizer_bigger_than_logits(pkg):
    data = _manifest(pkg)
    data["architecture"]["vocab_size"] = 100
    _write(pkg, data)
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg),
                    "tokenizer has .* tokens but the model has only 100")


def test_manifest_newer_version(pkg):
    data = _manifest(pkg)
    data["format_version"] = 99
    _write(pkg, data)
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg), "upgrade onnxllm")


@pytest.mark.parametrize("field", ["architecture", "variants", "eos_token_ids", "format_version", "default_variant"])
def test_manifest_field_missing(pkg, field):
    data = _manifest(pkg)
    del data[field]
    _write(pkg, data)
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg), field)


def test_manifest_not_json(pkg):
    (pkg / "onnxllm.json").write_text("{not json")
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg), "not valid JSON")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "onnx/../../x.onnx", "a\x00b"])
def test_manifest_paths_confined(pkg, bad):
    data = _manifest(pkg)
    data["variants"]["fp32"]["file"] = bad
    _write(pkg, data)
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg), "unsafe path")


def test_symlink_leaving_package_refused(pkg, tmp_path):
    target = tmp_path / "elsewhere.onnx"
    shutil.move(pkg / "onnx" / "model.onnx", target)
    (pkg / "onnx" / "model.onnx").symlink_to(target)
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg), "unsafe path")


def test_safe_path_accepts_inside(pkg):
    assert safe_path(pkg, "onnx/model.onnx") == (pkg / "onnx" / "model.onnx").resolve()


def test_unknown_and_unavailable_device(pkg):
    _one_line_error(DeviceError, lambda: onnxllm.load(pkg, device="tpu"), "auto")
    _one_line_error(DeviceError, lambda: onnxllm.load(pkg, device="dml"))


def test_chat_template_sandbox(pkg):
    (pkg / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    data = _manifest(pkg)
    data["chat_template"] = "chat_template.jinja"
    _write(pkg, data)
    model = onnxllm.load(pkg)
    with pytest.raises(OnnxLLMError, match="unsafe"):
        model.generate([{"role": "user", "content": "hi"}])
    assert model.generate("the", max_tokens=2).token_ids  # still usable


def test_gguf_with_unhandled_tensor_type(tmp_path):
    import gguf
    import numpy as np

    from onnxllm.errors import UnsupportedModelError

    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    raw = np.zeros((4, 66), dtype=np.uint8)  # IQ2_XXS blocks: 66 bytes per 256 weights
    writer.add_tensor("token_embd.weight", raw, raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        onnxllm.export(path, tmp_path / "out")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json)
def test_random_manifests_only_raise_documented_error(data):
    try:
        parse_manifest(data)
    except InvalidPackageError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_manifests_only_raise_documented_error(tiny_llama, data):
    manifest = json.loads((tiny_llama / "onnxllm.json").read_text())

    def mutate(node, depth=0):
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node)))
            action = data.draw(st.sampled_from(["delete", "replace", "recurse"]))
            if action == "delete":
                del node[key]
            elif action == "replace" or depth > 3:
                node[key] = data.draw(_json)
            else:
                mutate(node[key], depth + 1)
        elif isinstance(node, list) and node:
            node[data.draw(st.integers(0, len(node) - 1))] = data.draw(_json)

    for _ in range(data.draw(st.integers(1, 3))):
        mutate(manifest)
    try:
        parse_manifest(manifest)
    except InvalidPackageError:
        pass


def test_generation_error_types(pkg):
    model = onnxllm.load(pkg)
    for bad in ({"top_k": 1.5}, {"temperature": float("nan")}, {"stop": [""]}):
        with pytest.raises(GenerationError):
            model.generate("the", **bad)


def test_two_processes_quantizing_one_package_keep_both_variants(tmp_path, tiny_llama):
    """The manifest is read at the start of quantize and written at the end: a lock keeps both."""
    import subprocess
    import sys

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_llama, pkg)
    code = "import sys, onnxllm; onnxllm.quantize(sys.argv[1], sys.argv[2], evaluate=False)"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(pkg), scheme]) for scheme in ("int8", "int4")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert {"fp32", "int8", "int4"} <= set(read_manifest(pkg).variants)


@pytest.mark.parametrize("bad", ["../../outside.onnx", "/etc/passwd"])
def test_genai_config_paths_confined(pkg, bad):
    config = json.loads((pkg / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = bad
    (pkg / "genai_config.json").write_text(json.dumps(config))
    _one_line_error(InvalidPackageError, lambda: onnxllm.load(pkg), "unsafe path")


@pytest.mark.parametrize("where", ["/proc/x/pkg", "/proc/x", "FILE/pkg"])
def test_check_can_create_names_the_folder_and_creates_nothing(tmp_path, where):
    from onnxllm.package import check_can_create

    (tmp_path / "FILE").write_text("not a folder")
    target = where.replace("FILE", str(tmp_path / "FILE"))
    with pytest.raises(InvalidPackageError, match=f"cannot create {target}: .*; choose another folder"):
        check_can_create(target)
    check_can_create(tmp_path / "new" / "deeper" / "pkg")  # a folder that can be made passes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # and nothing was created
