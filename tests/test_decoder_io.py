"""The one description of a decoder's I/O: names, roles, KV layout, and the feeds built from it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

import onnxllm
from onnxllm.decoder_io import DecoderIO
from onnxllm.errors import InvalidPackageError
from onnxllm.package import IOSpec, KVCacheSpec, read_manifest
from onnxllm.runtime.kv_cache import GrowingKVCache, SharedKVCache


def _io(**kv) -> DecoderIO:
    return DecoderIO(IOSpec(logits_to_keep="num_logits_to_keep"), 2, 3, 4, KVCacheSpec(**kv))


def test_feed_has_every_role_and_an_empty_past():
    io = _io()
    feed = io.feed([5, 6, 7])
    assert feed["input_ids"].tolist() == [[5, 6, 7]] and feed["attention_mask"].shape == (1, 3)
    assert feed["position_ids"].tolist() == [[0, 1, 2]]
    assert [k for k in feed if "past" in k] == ["past_key_values.0.key", "past_key_values.0.value",
                                                "past_key_values.1.key", "past_key_values.1.value"]
    assert all(feed[k].shape == (1, 3, 0, 4) and feed[k].dtype == np.float32 for k in io.past_names())
    assert feed["num_logits_to_keep"] == 0 and io.feed([1], keep=1)["num_logits_to_keep"] == 1
    past = [np.ones((1, 3, 3, 4), np.float32)] * 4
    later = io.feed([8], start=3, past=past)
    assert later["attention_mask"].shape == (1, 4) and later["position_ids"].tolist() == [[3]]
    with pytest.raises(ValueError):
        io.feed([8], start=3)  # cached tokens need their past


def test_optional_inputs_and_the_genai_names():
    io = DecoderIO(IOSpec(position_ids=None, use_cache_branch="use_cache_branch"), 1, 1, 2)
    first, later = io.feed([1, 2]), io.feed([3], start=2, past=[np.zeros((1, 1, 2, 2), np.float32)] * 2)
    assert "position_ids" not in first
    assert first["use_cache_branch"].tolist() == [False] and later["use_cache_branch"].tolist() == [True]
    names = _io().genai_names()
    assert names["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert names["outputs"]["present_value_names"] == "present.%d.value"


def test_layout_and_dtype_are_read_not_assumed():
    bsnh = _io(layout="batch,sequence,kv_heads,head_dim", dtype="float16")
    assert bsnh.kv_shape(5) == (1, 5, 3, 4) and bsnh.seq_axis == 1 and not bsnh.bnsh
    assert bsnh.empty_past()[0].dtype == np.float16 and bsnh.empty_past()[0].shape == (1, 0, 3, 4)
    with pytest.raises(InvalidPackageError, match="layout"):
        _io(layout="batch,heads,sequence,head_dim")
    with pytest.raises(InvalidPackageError, match="dtype"):
        _io(dtype="int8")


def test_growing_cache_rewinds_along_the_layouts_sequence_axis():
    io = _io(layout="batch,sequence,kv_heads,head_dim")
    cache = GrowingKVCache(io, ("cpu", 0), context=16)
    presents = [np.arange(60, dtype=np.float32).reshape(1, 5, 3, 4) + i for i in range(4)]
    cache.store(presents, 0, 5)
    cache.rewind(2)
    assert [p.shape for p in cache.past(2)] == [(1, 2, 3, 4)] * 4
    np.testing.assert_array_equal(cache.past(2)[1], presents[1][:, :2])
    with pytest.raises(ValueError, match="layout"):
        SharedKVCache(io, ("cpu", 0), initial_capacity=8, context=16)


def test_outputs_are_read_by_name_not_position(tiny_llama):
    io = DecoderIO.from_manifest(read_manifest(tiny_llama))
    m = read_manifest(tiny_llama)
    sess = ort.InferenceSession(str(tiny_llama / m.variants["fp32"].file), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, io.feed([1, 2, 3]))
    shuffled = list(reversed(names)), list(reversed(values))
    out = io.outputs(*shuffled)
    np.testing.assert_array_equal(out.logits, values[names.index("logits")])
    assert [p.shape[2] for p in out.present] == [3] * (2 * m.architecture.num_layers)
    with pytest.raises(InvalidPackageError, match="lacks"):
        replace(io, names=replace(io.names, position_ids="positions")).check([i.name for i in sess.get_inputs()], names)


def test_a_manifest_without_a_shared_buffer_gets_the_growing_cache(tiny_llama, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_llama, pkg)
    data = json.loads((pkg / "onnxllm.json").read_text())
    data["kv_cache"]["shared_buffer"] = False
    (pkg / "onnxllm.json").write_text(json.dumps(data))
    m = onnxllm.load(pkg)
    assert isinstance(m.session.cache, GrowingKVCache) and not m.session.can_verify
    assert "shared buffer" in m.session.cache_note
    r = m.generate("the theory of", max_tokens=12)
    assert r.timings.drafted_tokens == 0
    assert r.token_ids == onnxllm.load(tiny_llama).generate("the theory of", max_tokens=12, draft_tokens=0).token_ids
