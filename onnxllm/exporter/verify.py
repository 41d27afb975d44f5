"""Check an exported decoder against the PyTorch model it came from: with and without past."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .architectures import DecoderDims

# float16 keeps ~3 significant digits; over 30 layers logits of magnitude ~20 drift by ~0.1-0.2.
TOLERANCE = {"float32": 1e-3, "float16": 0.3}


@dataclass(frozen=True)
class VerifyReport:
    max_abs_diff: float  # over every prompt, position and vocab entry
    max_abs_diff_with_past: float
    tolerance: float
    prompts: int

    @property
    def ok(self) -> bool:
        return max(self.max_abs_diff, self.max_abs_diff_with_past) <= self.tolerance


def _run(session, dims: DecoderDims, ids: np.ndarray, past, start: int, kv_dtype):
    seq = ids.shape[1]
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones((1, start + seq), np.int64),
        "position_ids": np.arange(start, start + seq, dtype=np.int64)[None],
    }
    for i in range(dims.num_layers):
        k, v = past[i] if past else (np.zeros((1, dims.num_kv_heads, 0, dims.head_dim), kv_dtype),) * 2
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
    out = session.run(None, feed)
    return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(dims.num_layers)]


def verify_export(onnx_path, torch_model, dims: DecoderDims, *, dtype: str = "float32",
                  prompts: int = 3, length: int = 12, seed: int = 0) -> VerifyReport:
    """Largest |logit difference| between ONNX Runtime (CPU) and PyTorch on random prompts."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the overridable num_logits_to_keep input draws a harmless warning
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    kv_dtype = np.float16 if dtype == "float16" else np.float32
    rng = np.random.default_rng(seed)
    full_diff = past_diff = 0.0
    for _ in range(prompts):
        ids = rng.integers(0, dims.vocab_size, size=(1, length), dtype=np.int64)
        with torch.no_grad():
            ref = torch_model(torch.from_numpy(ids)).logits.float().numpy()
        logits, _ = _run(session, dims, ids, None, 0, kv_dtype)
        full_diff = max(full_diff, float(np.abs(logits - ref).max()))
        split = length // 2
        _, past = _run(session, dims, ids[:, :split], None, 0, kv_dtype)
        logits_rest, _ = _run(session, dims, ids[:, split:], past, split, kv_dtype)
        past_diff = max(past_diff, float(np.abs(logits_rest - ref[:, split:]).max()))
    return VerifyReport(full_diff, past_diff, TOLERANCE[dtype], prompts)
