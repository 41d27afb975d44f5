"""Streaming export: weights read tensor by tensor from safetensors and written as the graph is built."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from _tiny import make_tiny_checkpoint

pytest.importorskip("transformers")

import onnxllm.exporter.export as ex  # noqa: E402
from onnxllm.exporter.architectures import extract_weights  # noqa: E402
from onnxllm.exporter.graph import build_decoder  # noqa: E402
from onnxllm.exporter.safetensors_reader import SafetensorsStateDict  # noqa: E402


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_streamed_graph_equals_inline_graph(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    ckpt = make_tiny_checkpoint(tmp_path, model_type)
    streamed = ex._streamed_model(ckpt, ex.ExportOptions())
    assert streamed is not None
    meta, sd = streamed
    assert all(p.is_meta for p in meta.parameters())  # no weights were loaded to describe the model
    data = io.BytesIO()
    lazy = build_decoder(extract_weights(meta, sd), data=data, location="model.onnx.data")
    inline = build_decoder(extract_weights(AutoModelForCausalLM.from_pretrained(ckpt).eval()))
    by_name = {t.name: t for t in lazy.graph.initializer}
    assert [t.name for t in inline.graph.initializer] == list(by_name)
    external = 0
    for tensor in inline.graph.initializer:
        ours = by_name[tensor.name]
        if ours.data_location == onnx.TensorProto.EXTERNAL:
            external += 1
            meta_data = {e.key: e.value for e in ours.external_data}
            assert int(meta_data["offset"]) % 64 == 0
            raw = data.getvalue()[int(meta_data["offset"]):int(meta_data["offset"]) + int(meta_data["length"])]
            got = np.frombuffer(raw, dtype=onnx.helper.tensor_dtype_to_np_dtype(ours.data_type)).reshape(ours.dims)
        else:
            got = onnx.numpy_helper.to_array(ours)
        np.testing.assert_array_equal(got, onnx.numpy_helper.to_array(tensor))
    assert external > 0
    assert sd.fp32_bytes() == 4 * sum(p.numel() for p in meta.parameters())  # the benchmark's yardstick


def test_checkpoint_with_other_tensor_names_loads_whole(tmp_path):
    """Names transformers would convert on load: no streaming, the model is loaded and exported as before."""
    from safetensors.numpy import load_file, save_file

    ckpt = make_tiny_checkpoint(tmp_path, "llama")
    tensors = load_file(str(ckpt / "model.safetensors"))
    save_file({k.replace("model.", "transformer.", 1): v for k, v in tensors.items()}, str(ckpt / "model.safetensors"),
              metadata={"format": "pt"})
    assert ex._streamed_model(ckpt, ex.ExportOptions()) is None


def test_streaming_reads_each_tensor_once_per_use(tmp_path, monkeypatch):
    """Building reads tensors as it writes them: at most one layer's tensors are alive at a time."""
    ckpt = make_tiny_checkpoint(tmp_path, "llama", num_hidden_layers=3)
    meta, sd = ex._streamed_model(ckpt, ex.ExportOptions())
    reads: list[str] = []
    original = SafetensorsStateDict.__getitem__

    def counting(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(SafetensorsStateDict, "__getitem__", counting)
    weights = extract_weights(meta, sd)
    assert reads == []  # describing the model reads nothing
    build_decoder(weights, data=io.BytesIO(), location="model.onnx.data")
    layer_of = [int(k.split(".")[2]) for k in reads if k.startswith("model.layers.")]
    assert layer_of == sorted(layer_of)  # layer by layer, in order
    assert sorted(set(reads)) == sorted(sd)
