"""The decoder session: one ONNX Runtime session, its KV cache and its IO binding.

It owns the cache (a strategy from kv_cache.py); callers only say which tokens to feed. It knows
nothing about text. Names and roles of the graph's inputs and outputs come from a DecoderIO.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..decoder_io import DecoderIO
from ..errors import ContextOverflowError, GenerationError, InvalidPackageError
from ..package import Manifest
from .kv_cache import GrowingKVCache, KVCache, SharedKVCache
from .lookup import verify_cost

KV_MODES = ("shared", "growing")


@dataclass(frozen=True)
class SessionConfig:
    kv_mode: str = "shared"  # "shared" | "growing" (kv_cache.py)
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


def _cache_for(io: DecoderIO, kv: str, device, config: SessionConfig, context: int) -> tuple[KVCache, str | None]:
    """The cache strategy, and why it is not the one asked for (None when it is)."""
    if kv == "shared" and not io.kv.shared_buffer:
        return GrowingKVCache(
            io, device, context=context
        ), "the graph's attention concatenates past and new KV (no shared buffer)"
    if kv == "shared" and not io.bnsh:
        return GrowingKVCache(io, device, context=context), f"the KV layout {io.kv.layout} is not a shared buffer's"
    if kv == "shared":
        return SharedKVCache(io, device, initial_capacity=config.initial_capacity, context=context), None
    return GrowingKVCache(io, device, context=context), None


class DecoderSession:
    """prefill/decode over a KV cache that remembers which tokens it holds (for prefix reuse)."""

    def __init__(self, ort_session, manifest: Manifest, *, config: SessionConfig = SessionConfig(),
                 context: int | None = None, variant: str | None = None):
        import onnxruntime as ort

        if config.kv_mode not in KV_MODES:
            raise GenerationError(f"kv_mode must be 'shared' or 'growing', got {config.kv_mode!r}")
        self.session = ort_session
        self.manifest = manifest
        self.config = config
        arch = manifest.architecture
        if context is not None and (not isinstance(context, int) or context < 1):
            raise GenerationError(f"context must be a positive number of tokens, got {context!r}")
        self.context = min(context or arch.context_length, arch.context_length)
        self.io = DecoderIO.from_manifest(manifest, variant)
        self._check_io()
        self.cache, self.cache_note = _cache_for(self.io, config.kv_mode, _device_of(ort_session.get_providers()),
                                                 config, self.context)
        # Our graphs declare num_logits_to_keep as an input with a default initializer (0: every position),
        # which ORT lists among the overridable initializers, not the inputs. Each call binds it: 1 for the
        # generation loop (a 512-token prefill then computes one row of logits, not 512 x 49152), 0 for
        # every fed position (a speculative check feeds a few tokens and needs each one's logits).
        keep = self.io.names.logits_to_keep
        graph_inputs = {i.name for i in ort_session.get_inputs()}
        graph_inputs |= {i.name for i in ort_session.get_overridable_initializers()}
        self._keep_name = keep if keep in graph_inputs else None
        self._keep_values = {n: ort.OrtValue.ortvalue_from_numpy(np.array(n, dtype=np.int64)) for n in (0, 1)}
        self.tokens: list[int] = []  # what the cache holds, position by position
        self.passes = 0  # model calls made so far (a chunked prefill makes several)
        # what a multi-token pass costs here, by the variant's kernels on the provider ORT runs it with
        method = getattr(manifest.variants.get(variant), "method", None) if variant else None
        self.verify_cost = verify_cost(method, ort_session.get_providers()[0])

    # -- public -----------------------------------------------------------------------------
    @property
    def can_verify(self) -> bool:
        """Whether speculative checks are cheap here: rewinding the cache costs nothing."""
        return self.cache.can_rewind

    @property
    def capacity(self) -> int:
        """Positions the KV cache holds before it must grow."""
        return self.cache.capacity

    def reset(self) -> None:
        self.tokens = []
        self.cache.reset()

    def rewind(self, n: int) -> None:
        """Keep only the first n cached tokens."""
        if n >= len(self.tokens):
            return
        switch = self.io.kv.recompute_past_at
        if switch and n <= switch < len(self.tokens):  # the kept keys were rotated with the long factors
            kept = self.tokens[:n]
            self.reset()
            if kept:
                self.forward(kept)
            return
        self.cache.rewind(n)
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
        self.cache.reserve(total, len(self.tokens))

    def forward(self, ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Feed `ids` after the cached tokens; logits of the last position (vocab,), or all (len, vocab).

        More than `config.prefill_chunk` tokens go in chunks of that size, one pass each."""
        ids = list(ids)
        self.reserve(len(self.tokens) + len(ids))
        chunk = self.config.prefill_chunk
        switch = self.io.kv.recompute_past_at
        if switch and len(self.tokens) <= switch < len(self.tokens) + len(ids):
            # LongRoPE: past `switch` positions every key uses the long factors, so the cached (short) keys are
            # recomputed, in one pass: a first chunk short of the switch would be rotated with the short ones.
            fed, ids = len(ids), self.tokens + ids
            self.reset()
            logits = self._pass(ids, all_logits)
            return logits[-fed:] if all_logits else logits
        if chunk <= 0 or len(ids) <= chunk:
            return self._pass(ids, all_logits)
        rows = [self._pass(ids[i:i + chunk], all_logits) for i in range(0, len(ids), chunk)]
        return np.concatenate(rows) if all_logits else rows[-1]

    # -- internals --------------------------------------------------------------------------
    def _pass(self, ids: list[int], all_logits: bool) -> np.ndarray:
        keep = 0 if all_logits else 1  # the graph's 0: every position
        run = self._run_bound if self.config.io_binding else self._run_plain
        logits = run(ids, len(self.tokens), keep)  # (1, S or 1, vocab)
        self.tokens.extend(ids)
        self.passes += 1
        logits = logits.astype(np.float32, copy=False)  # float16 graphs give float16 logits
        return logits[0, -len(ids):] if all_logits else logits[0, -1]

    def _check_io(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = self.session.get_outputs()
        self.io.check(inputs, [o.name for o in outputs])
        logits = next(o for o in outputs if o.name == self.io.names.logits)
        vocab = logits.shape[-1] if logits.shape else None
        if isinstance(vocab, int) and vocab != self.manifest.architecture.vocab_size:
            raise InvalidPackageError(
                f"the model's logits have {vocab} entries but the manifest says vocab_size "
                f"{self.manifest.architecture.vocab_size}; re-export the package"
            )

    def _run_bound(self, ids: list[int], start: int, keep: int) -> np.ndarray:
        logits_name = self.io.names.logits
        binding = self.cache.binding(self.session, logits_name)
        if self._keep_name is not None:
            binding.bind_ortvalue_input(self._keep_name, self._keep_values[keep])
        for name, value in self.io.step_inputs(ids, start).items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(logits_name, "cpu")  # rebound: its shape changes with the input length
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.cache.take_bound(outputs[1:])  # _pass extends self.tokens right after: nothing in between can raise
        return outputs[0].numpy()

    def _run_plain(self, ids: list[int], start: int, keep: int) -> np.ndarray:
        """Without IO binding: numpy in, numpy out (the reference path the bound one is tested against)."""
        feed = self.io.feed(ids, start=start, past=self.cache.past(start))
        if self._keep_name is not None:
            feed[self._keep_name] = np.array(keep, dtype=np.int64)
        out = self.io.run(self.session, feed)
        self.cache.store(out.present, start, start + len(ids))
        return out.logits


def open_session(onnx_path: Path, manifest: Manifest, *, providers: list, options,
                 config: SessionConfig = SessionConfig(), context: int | None = None,
                 variant: str | None = None) -> DecoderSession:
    """An InferenceSession over a package's .onnx; ORT errors become InvalidPackageError."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile classes, not a common base
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidPackageError(
            f"ONNX Runtime cannot load {onnx_path}: {first[:300]}; the file may be truncated or corrupt: re-export it"
        ) from None
    return DecoderSession(sess, manifest, config=config, context=context, variant=variant)
