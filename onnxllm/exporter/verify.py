"""Check an exported decoder against the PyTorch model it came from: with and without past."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..decoder_io import DecoderIO

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


def _run(session, io: DecoderIO, ids: np.ndarray, past, start: int):
    out = io.run(session, io.feed(ids, start=start, past=past))
    return out.logits, out.present


def _references(torch_model, vocab_size: int, prompts: int, length: int, seed: int):
    import torch

    model = torch_model() if callable(torch_model) and not isinstance(torch_model, torch.nn.Module) else torch_model
    rng = np.random.default_rng(seed)
    refs = []
    for _ in range(prompts):
        ids = rng.integers(0, vocab_size, size=(1, length), dtype=np.int64)
        with torch.no_grad():
            refs.append((ids, model(torch.from_numpy(ids)).logits.float().numpy()))
    return refs


def verify_export(onnx_path, torch_model, io: DecoderIO, *, vocab_size: int, dtype: str = "float32",
                  prompts: int = 3, length: int = 12, seed: int = 0) -> VerifyReport:
    """Largest |logit difference| between ONNX Runtime (CPU) and PyTorch on random prompts.

    `torch_model`: the model, or a function that loads it. PyTorch's logits come first, so a loaded model
    is freed (when the caller holds no other reference) before the ONNX session needs the same memory."""
    import gc

    import onnxruntime as ort

    refs = _references(torch_model, vocab_size, prompts, length, seed)
    del torch_model
    gc.collect()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the overridable num_logits_to_keep input draws a harmless warning
    # Pre-packing copies every MatMul weight into the CPU kernels' layout (a second copy of the model):
    # worth it for a session that generates, not for a few verification passes.
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    full_diff = past_diff = 0.0
    for ids, ref in refs:
        logits, _ = _run(session, io, ids, None, 0)
        full_diff = max(full_diff, float(np.abs(logits - ref).max()))
        split = length // 2
        _, past = _run(session, io, ids[:, :split], None, 0)
        logits_rest, _ = _run(session, io, ids[:, split:], past, split)
        past_diff = max(past_diff, float(np.abs(logits_rest - ref[:, split:]).max()))
    return VerifyReport(full_diff, past_diff, TOLERANCE[dtype], prompts)
