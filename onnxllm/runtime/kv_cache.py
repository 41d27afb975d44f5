"""The KV cache, one class per strategy; the decoder session owns one and knows only this interface.

  - SharedKVCache: one preallocated (1, kv_heads, capacity, head_dim) buffer per layer and K/V, bound as
    both past and present, which GroupQueryAttention updates in place (gpt-fast's static cache written at
    input_pos). No per-token allocation, on CUDA the cache never leaves the device, and rewinding is free:
    the attention mask says how many positions count.
  - GrowingKVCache: each pass's present tensors become the next pass's past (ORT allocates them), the
    layout optimum and transformers.js graphs use (they concatenate). Rewinding copies a slice.

Both hold no tokens: the session tells them how many positions are valid (`kept`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..decoder_io import DecoderIO


class KVCache(Protocol):
    can_rewind: bool  # rewind costs nothing, so speculative passes that miss are cheap
    capacity: int  # positions held without reallocating

    def reset(self) -> None: ...
    def reserve(self, total: int, kept: int) -> None: ...
    def rewind(self, n: int) -> None: ...
    def binding(self, session, first_output: str): ...
    def take_bound(self, presents: list) -> None: ...
    def past(self, kept: int) -> list[np.ndarray]: ...
    def store(self, presents: list[np.ndarray], kept: int, total: int) -> None: ...


def _ort():
    import onnxruntime as ort

    return ort


class SharedKVCache:
    """Past and present bound to one buffer per tensor; grows by reallocation, never per token."""

    can_rewind = True

    def __init__(self, io: DecoderIO, device: tuple[str, int], *, initial_capacity: int, context: int):
        if not io.bnsh:
            raise ValueError("a shared KV buffer needs the (batch, kv_heads, sequence, head_dim) layout")
        self.io, self.device, self.context = io, device, context
        self.initial_capacity = min(initial_capacity, context)
        self.buffers: list = []  # OrtValues: [k0, v0, k1, v1, ...]
        self.capacity = 0
        self._binding = None
        self.reset()

    def reset(self) -> None:
        if not self.buffers:
            self._allocate(self.initial_capacity, 0)

    def reserve(self, total: int, kept: int) -> None:
        if total > self.capacity:
            self._allocate(min(self.context, max(total, 2 * self.capacity)), kept)

    def rewind(self, n: int) -> None:
        pass  # positions past n are overwritten by the next pass; the mask hides them until then

    def _allocate(self, capacity: int, kept: int) -> None:
        """(Re)allocate the buffers, keeping the first `kept` positions."""
        ort = _ort()
        new = []
        for old in self.buffers or [None] * (2 * self.io.num_layers):
            buf = np.empty(self.io.kv_shape(capacity), self.io.kv_dtype)  # (1, H_kv, capacity, D)
            buf.fill(0)  # touch every page now: np.zeros would map them lazily, as the chat grows
            if old is not None and kept:
                buf[:, :, :kept] = old.numpy()[:, :, :kept]
            new.append(ort.OrtValue.ortvalue_from_numpy(buf, *self.device))
        self.buffers = new
        self.capacity = capacity
        self._binding = None  # bound to the old buffers

    def binding(self, session, first_output: str):
        """An IOBinding with the cache bound as past and present; made once per allocation."""
        if self._binding is None:
            binding = session.io_binding()
            binding.bind_output(first_output, "cpu")  # first: get_outputs() keeps binding order
            for name, present, buf in zip(self.io.past_names(), self.io.present_names(), self.buffers):
                binding.bind_ortvalue_input(name, buf)
                binding.bind_ortvalue_output(present, buf)  # GroupQueryAttention writes in place
            self._binding = binding
        return self._binding

    def take_bound(self, presents: list) -> None:
        pass  # already written in place

    def past(self, kept: int) -> list[np.ndarray]:
        return [np.ascontiguousarray(b.numpy()[:, :, :kept]) for b in self.buffers]

    def store(self, presents: list[np.ndarray], kept: int, total: int) -> None:
        ort = _ort()
        for i, present in enumerate(presents):
            buf = self.buffers[i].numpy().copy()
            buf[:, :, kept:total] = present[:, :, kept:total]
            self.buffers[i] = ort.OrtValue.ortvalue_from_numpy(buf, *self.device)
        self._binding = None


class GrowingKVCache:
    """Each pass's present becomes the next past: what graphs that concatenate past and new KV need."""

    can_rewind = False  # a rewind copies the kept slice of every tensor

    def __init__(self, io: DecoderIO, device: tuple[str, int], *, context: int):
        self.io, self.device, self.context = io, device, context
        self.capacity = context
        self.tensors: list = []
        self.reset()

    def reset(self) -> None:
        ort = _ort()
        self.tensors = [ort.OrtValue.ortvalue_from_numpy(e, *self.device) for e in self.io.empty_past()]

    def reserve(self, total: int, kept: int) -> None:
        pass  # ORT allocates each pass's present

    def rewind(self, n: int) -> None:
        if n == 0:
            self.reset()
            return
        ort = _ort()
        kept = [slice(None)] * 4
        kept[self.io.seq_axis] = slice(0, n)
        self.tensors = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t.numpy()[tuple(kept)]), *self.device)
                        for t in self.tensors]

    def binding(self, session, first_output: str):
        binding = session.io_binding()
        binding.bind_output(first_output, "cpu")
        for name, present, tensor in zip(self.io.past_names(), self.io.present_names(), self.tensors):
            binding.bind_ortvalue_input(name, tensor)
            binding.bind_output(present, *self.device)
        return binding

    def take_bound(self, presents: list) -> None:
        self.tensors = presents

    def past(self, kept: int) -> list[np.ndarray]:
        return [t.numpy() for t in self.tensors]

    def store(self, presents: list[np.ndarray], kept: int, total: int) -> None:
        ort = _ort()
        self.tensors = [ort.OrtValue.ortvalue_from_numpy(p, *self.device) for p in presents]
