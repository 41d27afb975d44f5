"""One description of a decoder graph's inputs and outputs, and the feeds built from it.

Every place that runs a decoder (the runtime session, export verification, the quality measure, the
int8-dynamic calibration, the genai_config writer, tests) reads names, roles, KV layout and dtype from a
`DecoderIO` instead of writing them again. It knows nothing about sessions or text: numpy in, dicts out.

Roles: input_ids (1, S) and attention_mask (1, past + S) always; position_ids (1, S) when the graph has
them; past key/value per layer in, present key/value per layer out, in the layout the manifest names
(ours: batch, kv_heads, sequence, head_dim); optional scalars: logits_to_keep (logits for the last N
positions only, 0: all) and use_cache_branch (optimum's merged decoders: True once there is a past).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .errors import InvalidPackageError
from .package import IOSpec, KVCacheSpec, Manifest

KV_AXES = ("batch", "kv_heads", "sequence", "head_dim")
KV_DTYPES = {"float32": np.float32, "float16": np.float16}


def parse_layout(layout: str) -> tuple[str, ...]:
    """The axes of a KV tensor, in order: a permutation of KV_AXES written "batch,kv_heads,..."."""
    axes = tuple(a.strip() for a in layout.split(",")) if isinstance(layout, str) else ()
    if sorted(axes) != sorted(KV_AXES):
        raise InvalidPackageError(f"KV cache layout {layout!r} is not an order of {','.join(KV_AXES)}; "
                                  "fix kv_cache.layout in the manifest or re-export the package")
    return axes


@dataclass(frozen=True)
class DecoderOutputs:
    """One pass's outputs by role: logits (1, S, vocab) and the present KV as [k0, v0, k1, v1, ...]."""

    logits: np.ndarray
    present: list


@dataclass(frozen=True)
class DecoderIO:
    names: IOSpec
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv: KVCacheSpec = KVCacheSpec()

    def __post_init__(self):
        parse_layout(self.kv.layout)
        if self.kv.dtype not in KV_DTYPES:
            raise InvalidPackageError(f"KV cache dtype {self.kv.dtype!r} is not supported; "
                                      f"use one of {', '.join(KV_DTYPES)}")

    @classmethod
    def from_manifest(cls, manifest: Manifest, variant: str | None = None) -> "DecoderIO":
        """The package's I/O, or the variant's own where it has one (graphs read from a foreign folder)."""
        a = manifest.architecture
        v = manifest.variants.get(variant) if variant is not None else None
        io = v.io if v is not None and v.io is not None else manifest.io
        kv = v.kv_cache if v is not None and v.kv_cache is not None else manifest.kv_cache
        return cls(io, a.num_layers, a.num_kv_heads, a.head_dim, kv)

    # -- KV tensors ----------------------------------------------------------------------------
    @property
    def kv_dtype(self) -> type:
        return KV_DTYPES[self.kv.dtype]

    @property
    def seq_axis(self) -> int:
        """Which axis of a KV tensor grows with the tokens cached."""
        return parse_layout(self.kv.layout).index("sequence")

    @property
    def bnsh(self) -> bool:
        """(batch, kv_heads, sequence, head_dim): the layout GroupQueryAttention's shared buffer needs."""
        return parse_layout(self.kv.layout) == KV_AXES

    def kv_shape(self, length: int) -> tuple[int, ...]:
        sizes = {"batch": 1, "kv_heads": self.num_kv_heads, "sequence": length, "head_dim": self.head_dim}
        return tuple(sizes[a] for a in parse_layout(self.kv.layout))

    def past_names(self) -> list[str]:
        """Past inputs in cache order: [key 0, value 0, key 1, value 1, ...]."""
        n = self.names
        return [name for i in range(self.num_layers) for name in (n.past_key.format(i), n.past_value.format(i))]

    def present_names(self) -> list[str]:
        """Present outputs in the same order as past_names()."""
        n = self.names
        return [name for i in range(self.num_layers) for name in (n.present_key.format(i), n.present_value.format(i))]

    def empty_past(self) -> list[np.ndarray]:
        empty = np.zeros(self.kv_shape(0), self.kv_dtype)
        return [empty] * (2 * self.num_layers)

    # -- feeds ---------------------------------------------------------------------------------
    def step_inputs(self, ids: Sequence[int] | np.ndarray, start: int) -> dict[str, np.ndarray]:
        """Every input but the past and logits_to_keep for feeding `ids` after `start` cached tokens."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)  # (1, S)
        n = self.names
        feed = {n.input_ids: ids, n.attention_mask: np.ones((1, start + ids.shape[1]), np.int64)}  # (1, T)
        if n.position_ids is not None:
            feed[n.position_ids] = np.arange(start, start + ids.shape[1], dtype=np.int64)[None]  # (1, S)
        if n.use_cache_branch is not None:
            feed[n.use_cache_branch] = np.array([start > 0])
        return feed

    def feed(self, ids: Sequence[int] | np.ndarray, *, start: int = 0, past: Sequence[np.ndarray] | None = None,
             keep: int = 0) -> dict[str, np.ndarray]:
        """A whole plain-session feed: `ids` after `start` tokens whose KV is `past` (None: an empty past).

        keep: the logits_to_keep value when the graph has that input (0: every position)."""
        if past is None and start:
            raise ValueError("a feed after cached tokens needs their past")
        feed = self.step_inputs(ids, start)
        feed.update(zip(self.past_names(), self.empty_past() if past is None else past))
        if self.names.logits_to_keep is not None:
            feed[self.names.logits_to_keep] = np.array(keep, dtype=np.int64)
        return feed

    def outputs(self, names: Sequence[str], values: Sequence) -> DecoderOutputs:
        """Read a run's outputs (`session.run(None, ...)` values with their names) by role, not position."""
        by_name = dict(zip(names, values))
        return DecoderOutputs(by_name[self.names.logits], [by_name[n] for n in self.present_names()])

    def run(self, session, feed: Mapping[str, np.ndarray]) -> DecoderOutputs:
        """One plain onnxruntime pass: logits and present KV by role."""
        names = [o.name for o in session.get_outputs()]
        return self.outputs(names, session.run(names, dict(feed)))

    # -- checks and other runtimes' names ------------------------------------------------------
    def required_inputs(self) -> list[str]:
        n = self.names
        optional = [n.position_ids, n.use_cache_branch]
        return [n.input_ids, n.attention_mask, *[x for x in optional if x is not None], *self.past_names()]

    def check(self, input_names: Sequence[str], output_names: Sequence[str], where: str = "the ONNX model") -> None:
        """Raise InvalidPackageError when the graph lacks a name this description feeds or reads."""
        missing = [x for x in self.required_inputs() if x not in set(input_names)]
        missing += [x for x in (self.names.logits, *self.present_names()) if x not in set(output_names)]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise InvalidPackageError(f"{where} lacks {shown}, which its description names; "
                                      "re-export the package (or re-import the folder)")

    def genai_names(self) -> dict:
        """The "inputs" and "outputs" sections of onnxruntime-genai's genai_config.json (%d for the layer)."""
        n = self.names
        inputs = {"input_ids": n.input_ids, "attention_mask": n.attention_mask,
                  "past_key_names": n.past_key.replace("{}", "%d"),
                  "past_value_names": n.past_value.replace("{}", "%d")}
        if n.position_ids is not None:
            inputs["position_ids"] = n.position_ids
        outputs = {"logits": n.logits, "present_key_names": n.present_key.replace("{}", "%d"),
                   "present_value_names": n.present_value.replace("{}", "%d")}
        return {"inputs": inputs, "outputs": outputs}
