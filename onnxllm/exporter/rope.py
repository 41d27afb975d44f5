"""RoPE tables from transformers' own RoPE code, so every rope_type it knows comes out the same.

One `RopeTable` per distinct (base, scaling) a model uses: Gemma 3 has two (global layers and local
`sliding_attention` layers with `rope_local_base_freq`), most models one. LongRoPE (Phi-3.5, Phi-4-mini)
has two sets of frequencies switched at `original_max_position_embeddings`; the graph holds both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UnsupportedModelError

SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeTable:
    inv_freq: np.ndarray  # (rotary_dim / 2,)
    scaling: float  # transformers' attention_scaling: multiplies cos and sin
    long_inv_freq: np.ndarray | None = None  # LongRoPE: used when the highest position + 1 exceeds `switch`
    switch: int = 0  # LongRoPE's original_max_position_embeddings

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)

    def fusable(self, head_dim: int) -> bool:
        """GroupQueryAttention's fused rotary needs (rotary_dim / 2) % 8 == 0 (checked in onnxruntime 1.32)."""
        return self.rotary_dim <= head_dim and (self.rotary_dim // 2) % 8 == 0


def _numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _rope_type(rotary, layer_type: str | None) -> str:
    kind = getattr(rotary, "rope_type", "default")
    if isinstance(kind, dict):
        kind = kind.get(layer_type, "default")
    return str(kind)


def _table(rotary, config, layer_type: str | None) -> RopeTable:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = _rope_type(rotary, layer_type)
    if kind not in SUPPORTED_ROPE:
        raise UnsupportedModelError(
            f"rope_type {kind!r} changes with sequence length and is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE)}"
        )
    prefix = f"{layer_type}_" if layer_type else ""
    if kind == "longrope":
        params = config.rope_parameters[layer_type] if layer_type else config.rope_parameters
        switch = int(params.get("original_max_position_embeddings")
                     or getattr(config, "original_max_position_embeddings", None) or 0)
        init = ROPE_INIT_FUNCTIONS["longrope"]
        extra = {"layer_type": layer_type} if layer_type else {}
        short, scaling = init(config, None, **extra)
        long, _ = init(config, None, seq_len=switch + 1, **extra)
        return RopeTable(_numpy(short), float(scaling), _numpy(long), switch)
    # `inv_freq` itself may have been swapped by a dynamic update; the original is what a fresh model uses.
    inv = getattr(rotary, f"{prefix}original_inv_freq", None)
    if inv is None:
        inv = getattr(rotary, f"{prefix}inv_freq")
    return RopeTable(_numpy(inv), float(getattr(rotary, f"{prefix}attention_scaling", 1.0)))


def rope_tables(model) -> tuple[list[RopeTable], list[int]]:
    """(tables, index of each layer's table). Layers without RoPE still get an index; their spec says -1."""
    config = model.config
    rotary = model.model.rotary_emb
    if any(b.is_meta for b in rotary.buffers()):  # a streaming export's model has no data: make this part real
        rotary = type(rotary)(config=config)
    layer_types = list(getattr(config, "layer_types", None) or [])
    per_type = bool(layer_types) and all(hasattr(rotary, f"{t}_inv_freq") for t in set(layer_types))
    if not per_type:
        return [_table(rotary, config, None)], [0] * config.num_hidden_layers
    kinds = sorted(set(layer_types))
    tables = [_table(rotary, config, t) for t in kinds]
    return tables, [kinds.index(t) for t in layer_types]
