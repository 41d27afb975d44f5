"""The decoder session: one ONNX Runtime session, its KV cache and its IO binding.

It owns the cache; callers only say which tokens to feed. It knows nothing about text.
Two cache modes behind one interface:
  - "shared": one preallocated (1, kv_heads, capacity, head_dim) buffer per layer and K/V, bound as
    both past and present, which GroupQueryAttention updates in place. No per-token allocation, and
    on CUDA the cache never leaves the device.
  - "growing": each step's present tensors become the next step's past (ORT allocates them);
    the layout optimum and transformers.js use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ContextOverflowError, GenerationError, InvalidPackageError
from ..package import Manifest

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class SessionConfig:
    kv_mode: str = "shared"  # "shared" | "growing"
    io_binding: bool = True
    # Shared mode allocates this many positions at load and touches them (no page faults mid-generation).
    # Each call reserves prompt + max_tokens before its prefill, so the buffers grow once per call at most,
    # to exactly what the call needs or double the old size, whichever is more (up to the context length):
    # memory follows what generations need, as with genai's max_length, instead of a fixed 1024 positions
    # (SmolLM2, fp32 KV: 46 KiB per position; 256 positions = 11.5 MiB).
    initial_capacity: int = 256
    # A prompt longer than this is fed in chunks of this many tokens (0: all at once). Attention's
    # scores for a chunk are chunk x context, not prompt x prompt: a 2048-token SmolLM2 prompt raised peak
    # RSS by 328 MiB at once and by 64 MiB in chunks of 256, and prefilled at 916 tok/s instead of 558
    # (int8-dynamic, 2 threads); chunks of 128 saved more memory (+18 MiB) at 827 tok/s.
    prefill_chunk: int = 256


def _device_of(providers: Sequence[str]) -> tuple[str, int]:
    return ("cuda", 0) if providers and providers[0] == "CUDAExecutionProvider" else ("cpu", 0)


class DecoderSession:
    """prefill/decode over a KV cache that remembers which tokens it holds (for prefix reuse)."""

    def __init__(self, ort_session, manifest: Manifest, *, config: SessionConfig = SessionConfig(), context: int | None = None):
        import onnxruntime as ort

        self._ort = ort
        self.session = ort_session
        self.manifest = manifest
        self.config = config
        arch = manifest.architecture
        if context is not None and (not isinstance(context, int) or context < 1):
            raise GenerationError(f"context must be a positive number of tokens, got {context!r}")
        self.context = min(context or arch.context_length, arch.context_length)
        self.io = manifest.io
        self.num_layers = arch.num_layers
        self._kv_shape = (1, arch.num_kv_heads, 0, arch.head_dim)
        self._kv_dtype = _NP_DTYPES.get(manifest.kv_cache.dtype, np.float32)
        self._device = _device_of(ort_session.get_providers())
        self._check_io()
        # The graph declares num_logits_to_keep as an input with a default initializer (0: every position),
        # which ORT lists among the overridable initializers, not the inputs. Each call binds it: 1 for the
        # generation loop (a 512-token prefill then computes one row of logits, not 512 x 49152), 0 for
        # every fed position (a speculative check feeds a few tokens and needs each one's logits).
        overridable = {i.name for i in ort_session.get_overridable_initializers()}
        self._keep_name = self.io.logits_to_keep if self.io.logits_to_keep in overridable else None
        self._keep_values = {n: ort.OrtValue.ortvalue_from_numpy(np.array(n, dtype=np.int64)) for n in (0, 1)}
        self.tokens: list[int] = []  # what the cache holds, position by position
        self._kv: list = []  # OrtValues: [k0, v0, k1, v1, ...]
        self._capacity = 0
        self._binding = None
        self._mask = np.ones((1, self.context), dtype=np.int64)
        self.reset()

    # -- public -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.manifest.architecture.vocab_size

    @property
    def position(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.tokens = []
        if self.config.kv_mode == "growing":
            empty = np.zeros(self._kv_shape, self._kv_dtype)
            self._kv = [self._ort.OrtValue.ortvalue_from_numpy(empty, *self._device) for _ in range(2 * self.num_layers)]
            self._capacity = self.context
        elif not self._kv:
            self._allocate(min(self.config.initial_capacity, self.context))

    def rewind(self, n: int) -> None:
        """Keep only the first n cached tokens. Shared buffers need no copy: lengths come from the mask."""
        if n >= len(self.tokens):
            return
        switch = self.manifest.kv_cache.recompute_past_at
        if switch and n <= switch < len(self.tokens):  # the kept keys were rotated with the long factors
            kept = self.tokens[:n]
            self.reset()
            if kept:
                self.forward(kept)
            return
        if self.config.kv_mode == "growing":
            if n == 0:
                self.reset()
                return
            sliced = [self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :n]), *self._device)
                      for v in self._kv]
            self._kv = sliced
        self.tokens = self.tokens[:n]

    def common_prefix(self, ids: Sequence[int]) -> int:
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n

    def reserve(self, total: int) -> None:
        """Make room for `total` tokens; raises ContextOverflowError past the context length."""
        if total > self.context:
            raise ContextOverflowError(
                f"{total} tokens do not fit the context of {self.context}; shorten the prompt, lower max_tokens, "
                "or raise --context (up to the model's context length)"
            )
        if self.config.kv_mode == "shared" and total > self._capacity:
            self._allocate(min(self.context, max(total, 2 * self._capacity)))

    @property
    def can_verify(self) -> bool:
        """Whether speculative checks are cheap here: rewinding a shared cache costs nothing."""
        return self.config.kv_mode == "shared"

    def forward(self, ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Feed `ids` after the cached tokens; logits of the last position (vocab,), or all (len, vocab).

        More than `config.prefill_chunk` tokens go in chunks of that size, one pass each."""
        ids = list(ids)
        self.reserve(len(self.tokens) + len(ids))
        chunk = self.config.prefill_chunk
        switch = self.manifest.kv_cache.recompute_past_at
        if switch and len(self.tokens) <= switch < len(self.tokens) + len(ids):
            # LongRoPE: past `switch` positions every key uses the long factors, so the cached (short) keys are
            # recomputed, in one pass: a first chunk short of the switch would be rotated with the short ones.
            fed, ids = len(ids), self.tokens + ids
            self.reset()
            logits = self._forward(ids, all_logits)
            return logits[-fed:] if all_logits else logits
        if chunk <= 0 or len(ids) <= chunk:
            return self._forward(ids, all_logits)
        rows = [self._forward(ids[i:i + chunk], all_logits) for i in range(0, len(ids), chunk)]
        return np.concatenate(rows) if all_logits else rows[-1]

    # -- internals --------------------------------------------------------------------------
    def _forward(self, ids: list[int], all_logits: bool) -> np.ndarray:
        start = len(self.tokens)
        feed_ids = np.asarray([ids], dtype=np.int64)  # (1, S)
        positions = np.arange(start, start + len(ids), dtype=np.int64)[None]  # (1, S)
        mask = self._mask[:, : start + len(ids)]  # (1, T): a view, no allocation
        keep = 0 if all_logits else 1  # the graph's 0: every position
        if self.config.io_binding:
            logits = self._run_bound(feed_ids, mask, positions, keep)
        else:
            logits = self._run_plain(feed_ids, mask, positions, keep)
        self.tokens.extend(ids)
        return logits[0] if all_logits else logits[0, -1]

    def _check_io(self) -> None:
        names = {i.name for i in self.session.get_inputs()}
        needed = {self.io.input_ids, self.io.attention_mask, self.io.past_key.format(0)}
        missing = sorted(needed - names)
        if missing:
            raise InvalidPackageError(
                f"the ONNX model lacks inputs {missing} that the manifest names; re-export the package"
            )
        logits = next((o for o in self.session.get_outputs() if o.name == self.io.logits), None)
        vocab = logits.shape[-1] if logits is not None else None
        if isinstance(vocab, int) and vocab != self.manifest.architecture.vocab_size:
            raise InvalidPackageError(
                f"the model's logits have {vocab} entries but the manifest says vocab_size "
                f"{self.manifest.architecture.vocab_size}; re-export the package"
            )

    def _allocate(self, capacity: int) -> None:
        """(Re)allocate the shared buffers, keeping what the cache holds."""
        shape = (1, self._kv_shape[1], capacity, self._kv_shape[3])
        kept = len(self.tokens)
        new = []
        for old in self._kv or [None] * (2 * self.num_layers):
            buf = np.empty(shape, self._kv_dtype)
            buf.fill(0)  # touch every page now: np.zeros would map them lazily, as the chat grows
            if old is not None and kept:
                buf[:, :, :kept] = old.numpy()[:, :, :kept]
            new.append(self._ort.OrtValue.ortvalue_from_numpy(buf, *self._device))
        self._kv = new
        self._capacity = capacity
        self._binding = None  # bound to the old buffers

    def _names(self, i: int) -> tuple[str, str, str, str]:
        io = self.io
        return io.past_key.format(i), io.past_value.format(i), io.present_key.format(i), io.present_value.format(i)

    def _kv_binding(self):
        """An IOBinding with the KV cache bound; in shared mode it is made once per buffer allocation."""
        if self._binding is not None:
            return self._binding
        binding = self.session.io_binding()
        binding.bind_output(self.io.logits, "cpu")  # first: get_outputs() keeps binding order
        shared = self.config.kv_mode == "shared"
        for i in range(self.num_layers):
            pk, pv, ck, cv = self._names(i)
            binding.bind_ortvalue_input(pk, self._kv[2 * i])
            binding.bind_ortvalue_input(pv, self._kv[2 * i + 1])
            if shared:  # past and present are one buffer: GroupQueryAttention writes in place
                binding.bind_ortvalue_output(ck, self._kv[2 * i])
                binding.bind_ortvalue_output(cv, self._kv[2 * i + 1])
            else:
                binding.bind_output(ck, self._device[0], self._device[1])
                binding.bind_output(cv, self._device[0], self._device[1])
        if shared:
            self._binding = binding
        return binding

    def _run_bound(self, ids, mask, positions, keep: int) -> np.ndarray:
        binding = self._kv_binding()
        if self._keep_name is not None:
            binding.bind_ortvalue_input(self._keep_name, self._keep_values[keep])
        binding.bind_cpu_input(self.io.input_ids, ids)
        binding.bind_cpu_input(self.io.attention_mask, mask)
        binding.bind_cpu_input(self.io.position_ids, positions)
        binding.bind_output(self.io.logits, "cpu")  # rebound: its shape changes with the input length
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        if self.config.kv_mode != "shared":
            self._kv = outputs[1:]  # forward() extends self.tokens right after: nothing in between can raise
        return logits

    def _run_plain(self, ids, mask, positions, keep) -> np.ndarray:
        """Without IO binding: numpy in, numpy out (the reference path the bound one is tested against)."""
        feed = {self.io.input_ids: ids, self.io.attention_mask: np.ascontiguousarray(mask), self.io.position_ids: positions}
        if self._keep_name is not None:
            feed[self._keep_name] = np.array(keep, dtype=np.int64)
        kept = len(self.tokens)
        for i in range(self.num_layers):
            pk, pv, _, _ = self._names(i)
            feed[pk] = np.ascontiguousarray(self._kv[2 * i].numpy()[:, :, :kept] if self.config.kv_mode == "shared" else self._kv[2 * i].numpy())
            feed[pv] = np.ascontiguousarray(self._kv[2 * i + 1].numpy()[:, :, :kept] if self.config.kv_mode == "shared" else self._kv[2 * i + 1].numpy())
        out = self.session.run(None, feed)
        names = [o.name for o in self.session.get_outputs()]
        by_name = dict(zip(names, out))
        total = kept + ids.shape[1]
        for i in range(self.num_layers):
            _, _, ck, cv = self._names(i)
            if self.config.kv_mode == "shared":
                self._write_shared(2 * i, by_name[ck], kept, total)
                self._write_shared(2 * i + 1, by_name[cv], kept, total)
            else:
                self._kv[2 * i] = self._ort.OrtValue.ortvalue_from_numpy(by_name[ck], *self._device)
                self._kv[2 * i + 1] = self._ort.OrtValue.ortvalue_from_numpy(by_name[cv], *self._device)
        return by_name[self.io.logits]

    def _write_shared(self, index: int, present: np.ndarray, kept: int, total: int) -> None:
        buf = self._kv[index].numpy().copy()
        buf[:, :, kept:total] = present[:, :, kept:total]
        self._kv[index] = self._ort.OrtValue.ortvalue_from_numpy(buf, *self._device)


def open_session(onnx_path: Path, manifest: Manifest, *, providers: list, options, config: SessionConfig = SessionConfig(),
                 context: int | None = None) -> DecoderSession:
    """An InferenceSession over a package's .onnx; ORT errors become InvalidPackageError."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile classes, not a common base
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidPackageError(
            f"ONNX Runtime cannot load {onnx_path}: {first[:300]}; the file may be truncated or corrupt: re-export it"
        ) from None
    return DecoderSession(sess, manifest, config=config, context=context)
