"""Per-architecture differences as data: a registry of `Family` entries keyed by Hugging Face `model_type`.

Every supported architecture is reduced to one `DecoderWeights` shape (a decoder whose layers may have
norms before and/or after attention and MLP, optional q/k norms, fused QKV and gate/up projections, and a
per-layer attention spec); the graph builder reads those fields and knows nothing about model types.
What a family changes is written in its entry (norm names and placement, norm offset, multipliers,
soft-caps); per-layer facts (attention scale, window, soft-cap, RoPE or not) are read from the PyTorch
modules themselves, and RoPE tables from transformers' own RoPE functions (rope.py).
How to add a family: docs/ARCHITECTURES.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import UnsupportedModelError
from .rope import RopeTable, rope_tables

DOCS = "docs/ARCHITECTURES.md"

# HF activation names -> the ONNX activation the builder emits.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


class Lazy:
    """A weight computed when the graph builder writes it (read from safetensors, fused, offset...), so a
    streaming export holds one layer's tensors at a time instead of the whole model."""

    __slots__ = ("_load",)

    def __init__(self, load: Callable[[], np.ndarray]):
        self._load = load

    def load(self) -> np.ndarray:
        return self._load()


Tensor = np.ndarray | Lazy


def materialize(x: Tensor) -> np.ndarray:
    return x.load() if isinstance(x, Lazy) else x


@dataclass(frozen=True)
class Linear:
    weight: Tensor  # (out, in), the PyTorch nn.Linear layout
    bias: Tensor | None = None


@dataclass(frozen=True)
class Norm:
    weight: Tensor
    bias: Tensor | None = None  # LayerNorm only


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention, as the PyTorch module computes it."""

    scale: float  # multiplies q.k (1/sqrt(head_dim), query_pre_attn_scalar**-0.5, granite's multiplier...)
    softcap: float = 0.0  # scores -> softcap * tanh(scores / softcap); 0: none
    window: int = -1  # a query sees itself and the window - 1 keys before it; -1: every earlier key
    rope: int = 0  # index into DecoderWeights.rope; -1: no RoPE in this layer (SmolLM3's NoPE layers)


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Norm | None  # before attention (None: OLMo 2 normalizes after only)
    qkv: Linear  # rows: q heads, then k heads, then v heads
    o: Linear
    mlp_norm: Norm | None  # before the MLP
    up: Linear  # gated MLPs: rows are gate then up; plain MLPs: the fc layer
    down: Linear
    attention: AttentionSpec
    attn_out_norm: Norm | None = None  # on the attention output, before the residual add (Gemma 2/3, OLMo 2)
    mlp_out_norm: Norm | None = None  # on the MLP output, before the residual add
    # RMSNorm on q and k before RoPE: weight (head_dim,) per head (Qwen3, Gemma 3) or (heads * head_dim,)
    # over all heads at once (OLMo 2).
    q_norm: Norm | None = None
    k_norm: Norm | None = None


@dataclass(frozen=True)
class DecoderDims:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    context_length: int
    norm: str  # "rms" | "layer"
    norm_eps: float
    activation: str  # "silu" | "gelu_tanh" | "gelu"
    gated_mlp: bool
    positional: str  # "rope" | "learned"
    embed_scale: float  # multiplies the token embedding (gemma: sqrt(hidden), granite: embedding_multiplier)
    tied_embeddings: bool
    residual_scale: float = 1.0  # multiplies each block's output before the residual add (granite)
    logits_scale: float = 1.0  # multiplies the logits (granite: 1 / logits_scaling)
    final_softcap: float = 0.0  # logits -> cap * tanh(logits / cap) (gemma2); 0: none


@dataclass(frozen=True)
class DecoderWeights:
    dims: DecoderDims
    embed: Tensor  # (vocab, hidden)
    pos_embed: Tensor | None  # (context, hidden) for learned positions
    layers: Sequence[LayerWeights]
    final_norm: Norm
    lm_head: Tensor  # (vocab, hidden); the embedding itself (the same object) when tied
    rope: list[RopeTable]  # the RoPE tables layers point at (one per base/scaling); empty without RoPE


@dataclass(frozen=True)
class NormNames:
    """State-dict names of a layer's norms, by where they sit; None: the family has no norm there."""

    attn_in: str | None = "input_layernorm"
    attn_out: str | None = None
    mlp_in: str | None = "post_attention_layernorm"  # llama's name for the norm before its MLP
    mlp_out: str | None = None


SANDWICH = NormNames(attn_in="input_layernorm", attn_out="post_attention_layernorm",
                     mlp_in="pre_feedforward_layernorm", mlp_out="post_feedforward_layernorm")
POST_ONLY = NormNames(attn_in=None, attn_out="post_attention_layernorm", mlp_in=None,
                      mlp_out="post_feedforward_layernorm")


@dataclass(frozen=True)
class Family:
    """What one model_type does differently from llama, as data the extractor reads."""

    summary: str  # what differs, for `onnxllm export --help` and docs
    layout: str = "llama"  # state-dict layout: "llama" (model.layers.N.self_attn...) | "gpt2" (transformer.h.N...)
    norms: NormNames = NormNames()
    norm_offset: float = 0.0  # gemma's RMSNorm scales by (1 + weight)
    embed_scale: str | None = None  # "sqrt_hidden", or the config attribute that multiplies embeddings
    residual_multiplier: str | None = None  # config attribute scaling each block's output
    logits_divisor: str | None = None  # config attribute dividing the logits
    final_softcap: str | None = None  # config attribute soft-capping the logits
    genai_type: str = "llama"  # onnxruntime-genai's model type for genai_config.json


REGISTRY: dict[str, Family] = {
    "gpt2": Family("learned positions, LayerNorm, GELU MLP", layout="gpt2", genai_type="llama"),
    "llama": Family("RoPE (default, linear, llama3, yarn scaling), optional attention/MLP biases"),
    "mistral": Family("llama with a sliding window on every layer", genai_type="mistral"),
    "qwen2": Family("llama with q/k/v biases and optional sliding-window layers", genai_type="qwen2"),
    "qwen3": Family("per-head RMSNorm on q and k before RoPE, no qkv bias"),
    "phi3": Family("fused qkv and gate/up, LongRoPE (short/long factors), partial rotary", genai_type="phi3"),
    "gemma": Family("RMSNorm (1 + w), embeddings scaled by sqrt(hidden), GELU-tanh", norm_offset=1.0,
                    embed_scale="sqrt_hidden", genai_type="gemma"),
    "gemma2": Family("gemma with attention and final-logit soft-capping, alternating sliding windows, "
                     "pre/post norms, query_pre_attn_scalar", norms=SANDWICH, norm_offset=1.0,
                     embed_scale="sqrt_hidden", final_softcap="final_logit_softcapping"),
    "gemma3_text": Family("gemma2's norms plus per-head q/k norms, local/global layers with two RoPE bases",
                          norms=SANDWICH, norm_offset=1.0, embed_scale="sqrt_hidden",
                          final_softcap="final_logit_softcapping"),
    "smollm3": Family("llama with layers that skip RoPE (no_rope_layers)"),
    "granite": Family("llama with embedding, residual, attention and logits multipliers",
                      embed_scale="embedding_multiplier", residual_multiplier="residual_multiplier",
                      logits_divisor="logits_scaling"),
    "olmo2": Family("norms after attention and MLP only, RMSNorm on q and k over all heads", norms=POST_ONLY),
}

StateDict = Mapping[str, np.ndarray]


def supported_families() -> str:
    return ", ".join(sorted(REGISTRY))


def check_supported(model_type: str) -> None:
    if model_type not in REGISTRY:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; supported: {supported_families()} "
            f"(to add one, see {DOCS})"
        )


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _config_float(config, attribute: str | None, default: float) -> float:
    value = getattr(config, attribute, None) if attribute else None
    return default if value is None else float(value)


def _dims(config, family: Family, model_type: str) -> DecoderDims:
    hidden = _get(config, "hidden_size", "n_embd")
    heads = _get(config, "num_attention_heads", "n_head")
    head_dim = _get(config, "head_dim", default=hidden // heads)
    act_name = _get(config, "hidden_activation", "hidden_act", "activation_function", default="silu")
    if act_name not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"activation {act_name!r} of this {model_type} model is not supported; "
            f"supported: {', '.join(sorted(_ACTIVATIONS))}"
        )
    if head_dim % 16:
        raise UnsupportedModelError(
            f"this {model_type} model has head_dim {head_dim}; ONNX Runtime's GroupQueryAttention needs a multiple "
            "of 16 (every released model of the supported families has one)"
        )
    if family.embed_scale == "sqrt_hidden":
        embed_scale = math.sqrt(hidden)
    else:
        embed_scale = _config_float(config, family.embed_scale, 1.0)
    divisor = _config_float(config, family.logits_divisor, 1.0)
    return DecoderDims(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        num_layers=_get(config, "num_hidden_layers", "n_layer"),
        num_heads=heads,
        num_kv_heads=_get(config, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        intermediate_size=_get(config, "intermediate_size", "n_inner", default=4 * hidden),
        context_length=_get(config, "max_position_embeddings", "n_positions", default=2048),
        norm="layer" if family.layout == "gpt2" else "rms",
        norm_eps=float(_get(config, "rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", default=1e-5)),
        activation=_ACTIVATIONS[act_name],
        gated_mlp=family.layout != "gpt2",
        positional="learned" if family.layout == "gpt2" else "rope",
        embed_scale=embed_scale,
        tied_embeddings=bool(_get(config, "tie_word_embeddings", default=True)),
        residual_scale=_config_float(config, family.residual_multiplier, 1.0),
        logits_scale=1.0 / divisor,
        final_softcap=_config_float(config, family.final_softcap, 0.0),
    )


def _tensor(sd: StateDict, key: str, offset: float = 0.0) -> Lazy:
    return Lazy(lambda: sd[key] + offset if offset else sd[key])


def _lin(sd: StateDict, prefix: str) -> Linear:
    bias = prefix + ".bias"
    return Linear(_tensor(sd, prefix + ".weight"), _tensor(sd, bias) if bias in sd else None)


def _cat(*linears: Linear) -> Linear:
    def weight() -> np.ndarray:
        return np.concatenate([materialize(lin.weight) for lin in linears], axis=0)

    def bias() -> np.ndarray:
        parts = []
        for lin in linears:
            if lin.bias is not None:
                parts.append(materialize(lin.bias))
            else:  # only the rows' count is needed: read the weight once more (no bias is rare)
                parts.append(np.zeros(materialize(lin.weight).shape[0], np.float32))
        return np.concatenate(parts)

    has_bias = any(lin.bias is not None for lin in linears)
    return Linear(Lazy(weight), Lazy(bias) if has_bias else None)


def _attention_spec(attn, config, head_dim: int, rope_index: int) -> AttentionSpec:
    """Read from the attention module: what it computes is what the reference computes."""
    # Families that window some layers set `sliding_window` per module (None on full layers); mistral
    # and phi3 read the config's on every layer.
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
    uses_rope = bool(getattr(attn, "use_rope", True))  # SmolLM3's NoPE layers
    return AttentionSpec(
        scale=float(getattr(attn, "scaling", head_dim ** -0.5)),
        softcap=float(getattr(attn, "attn_logit_softcapping", None) or 0.0),
        window=int(window) if window else -1,
        rope=rope_index if uses_rope else -1,
    )


def _llama_like(model, sd: StateDict, family: Family, dims: DecoderDims) -> DecoderWeights:
    config = model.config
    tables, layer_tables = rope_tables(model)
    offset = family.norm_offset

    def norm(prefix: str, name: str | None) -> Norm | None:
        key = f"{prefix}{name}.weight" if name else None
        return Norm(_tensor(sd, key, offset)) if key and key in sd else None

    def layer(i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        if p + "self_attn.qkv_proj.weight" in sd:  # phi3 ships them fused already
            qkv = _lin(sd, p + "self_attn.qkv_proj")
            up = _lin(sd, p + "mlp.gate_up_proj")
        else:
            qkv = _cat(*(_lin(sd, p + f"self_attn.{n}_proj") for n in "qkv"))
            up = _cat(_lin(sd, p + "mlp.gate_proj"), _lin(sd, p + "mlp.up_proj"))
        attn = model.model.layers[i].self_attn
        return LayerWeights(
            attn_norm=norm(p, family.norms.attn_in),
            qkv=qkv,
            o=_lin(sd, p + "self_attn.o_proj"),
            mlp_norm=norm(p, family.norms.mlp_in),
            up=up,
            down=_lin(sd, p + "mlp.down_proj"),
            attention=_attention_spec(attn, config, dims.head_dim, layer_tables[i]),
            attn_out_norm=norm(p, family.norms.attn_out),
            mlp_out_norm=norm(p, family.norms.mlp_out),
            q_norm=norm(p, "self_attn.q_norm"),
            k_norm=norm(p, "self_attn.k_norm"),
        )

    embed = _tensor(sd, "model.embed_tokens.weight")
    return DecoderWeights(
        dims=dims,
        embed=embed,
        pos_embed=None,
        layers=[layer(i) for i in range(dims.num_layers)],  # descriptions only: weights load when written
        final_norm=Norm(_tensor(sd, "model.norm.weight", offset)),
        lm_head=embed if dims.tied_embeddings else _tensor(sd, "lm_head.weight"),
        rope=tables,
    )


def _gpt2(model, sd: StateDict, family: Family, dims: DecoderDims) -> DecoderWeights:
    def conv1d(prefix: str) -> Linear:  # GPT-2's Conv1D stores (in, out)
        return Linear(Lazy(lambda: np.ascontiguousarray(sd[prefix + ".weight"].T)), _tensor(sd, prefix + ".bias"))

    layers = []
    for i in range(dims.num_layers):
        p = f"transformer.h.{i}."
        layers.append(
            LayerWeights(
                attn_norm=Norm(_tensor(sd, p + "ln_1.weight"), _tensor(sd, p + "ln_1.bias")),
                qkv=conv1d(p + "attn.c_attn"),
                o=conv1d(p + "attn.c_proj"),
                mlp_norm=Norm(_tensor(sd, p + "ln_2.weight"), _tensor(sd, p + "ln_2.bias")),
                up=conv1d(p + "mlp.c_fc"),
                down=conv1d(p + "mlp.c_proj"),
                attention=AttentionSpec(scale=dims.head_dim ** -0.5, rope=-1),
            )
        )
    embed = _tensor(sd, "transformer.wte.weight")
    return DecoderWeights(
        dims=dims,
        embed=embed,
        pos_embed=_tensor(sd, "transformer.wpe.weight"),
        layers=layers,
        final_norm=Norm(_tensor(sd, "transformer.ln_f.weight"), _tensor(sd, "transformer.ln_f.bias")),
        lm_head=embed if dims.tied_embeddings else _tensor(sd, "lm_head.weight"),
        rope=[],
    )


_LAYOUTS = {"llama": _llama_like, "gpt2": _gpt2}


class _TorchStateDict(Mapping):
    """A loaded model's tensors as float32 numpy, converted when read (no copy for float32 weights)."""

    def __init__(self, model):
        self._tensors = model.state_dict()

    def __getitem__(self, key: str) -> np.ndarray:
        return self._tensors[key].detach().float().numpy()

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def extract_weights(model, state_dict: StateDict | None = None) -> DecoderWeights:
    """Reduce a transformers causal LM to the builder's uniform description. Weights come from `state_dict`
    (name -> float32 array, read on access: a streaming safetensors reader) or else from the model itself;
    the model supplies config and module attributes only, so with a state_dict it may live on the meta device."""
    config = model.config
    check_supported(config.model_type)
    family = REGISTRY[config.model_type]
    dims = _dims(config, family, config.model_type)
    sd = state_dict if state_dict is not None else _TorchStateDict(model)
    return _LAYOUTS[family.layout](model, sd, family, dims)


def describe_graph(w: DecoderWeights) -> dict:
    """What the exported graph does per layer, in words and numbers, for the manifest and the export output."""
    layers = []
    for layer in w.layers:
        a = layer.attention
        table = w.rope[a.rope] if a.rope >= 0 else None
        layers.append({
            "kernel": "GroupQueryAttention",
            "rotary": "none" if table is None else ("fused" if table.fusable(w.dims.head_dim) else "outside"),
            "rope_table": a.rope,
            "window": a.window,
            "softcap": a.softcap,
            "scale": a.scale,
            "qk_norm": layer.q_norm is not None,
        })
    notes = []
    if any(entry["rotary"] == "outside" for entry in layers):
        dims = sorted({2 * len(t.inv_freq) for t in w.rope if not t.fusable(w.dims.head_dim)})
        notes.append(f"rotary dimension {dims} is not a multiple of 16: RoPE is applied by explicit ops before "
                     "GroupQueryAttention, which then runs without its fused rotary")
    if any(t.long_inv_freq is not None for t in w.rope):
        switch = next(t.switch for t in w.rope if t.long_inv_freq is not None)
        notes.append(f"LongRoPE: short factors up to position {switch}, long factors past it (one table each, "
                     "chosen by the highest position fed); crossing it recomputes the KV cache")
    if any(layer.q_norm is not None for layer in w.layers):
        notes.append("q/k RMSNorm by SimplifiedLayerNormalization before GroupQueryAttention (its q_norm_weight "
                     "input is CUDA/WebGPU only)")
    if any(entry["softcap"] for entry in layers):
        notes.append("attention soft-capping by GroupQueryAttention's softcap attribute (checked on CPU)")
    if w.dims.final_softcap:
        notes.append(f"final logits soft-capped at {w.dims.final_softcap} by Tanh")
    return {"layers": layers, "notes": notes}
