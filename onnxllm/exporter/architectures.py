"""Per-architecture differences as data: a registry keyed by Hugging Face `model_type`.

Every supported architecture is reduced to one `DecoderWeights` shape (pre-norm decoder, fused
QKV and gate/up projections); the graph builder knows nothing about model types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..errors import UnsupportedModelError

# HF activation names -> the ONNX activation the builder emits.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


@dataclass(frozen=True)
class Linear:
    weight: np.ndarray  # (out, in), the PyTorch nn.Linear layout
    bias: np.ndarray | None = None


@dataclass(frozen=True)
class Norm:
    weight: np.ndarray
    bias: np.ndarray | None = None  # LayerNorm only


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Norm
    qkv: Linear  # rows: q heads, then k heads, then v heads
    o: Linear
    mlp_norm: Norm
    up: Linear  # gated MLPs: rows are gate then up; plain MLPs: the fc layer
    down: Linear


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
    embed_scale: float  # multiplies the token embedding (gemma: sqrt(hidden)); 1.0 elsewhere
    attn_scale: float
    sliding_window: int  # -1: none
    tied_embeddings: bool


@dataclass(frozen=True)
class DecoderWeights:
    dims: DecoderDims
    embed: np.ndarray  # (vocab, hidden)
    pos_embed: np.ndarray | None  # (context, hidden) for learned positions
    layers: list[LayerWeights]
    final_norm: Norm
    lm_head: np.ndarray  # (vocab, hidden); the embedding itself when tied
    inv_freq: np.ndarray | None  # (rotary_dim / 2,) for RoPE
    rope_scaling: float  # HF's attention_scaling, multiplies cos/sin


StateDict = Mapping[str, np.ndarray]


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _dims(config, *, model_type: str, norm: str, positional: str, gated: bool) -> DecoderDims:
    hidden = _get(config, "hidden_size", "n_embd")
    heads = _get(config, "num_attention_heads", "n_head")
    head_dim = _get(config, "head_dim", default=hidden // heads)
    act_name = _get(config, "hidden_activation", "hidden_act", "activation_function", default="silu")
    if act_name not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"activation {act_name!r} of this {model_type} model is not supported; "
            f"supported: {', '.join(sorted(_ACTIVATIONS))}"
        )
    pre_attn = _get(config, "query_pre_attn_scalar", default=head_dim)
    window = _get(config, "sliding_window", default=None)
    use_window = window is not None and _get(config, "use_sliding_window", default=True)
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
        norm=norm,
        norm_eps=float(_get(config, "rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", default=1e-5)),
        activation=_ACTIVATIONS[act_name],
        gated_mlp=gated,
        positional=positional,
        embed_scale=float(np.sqrt(hidden)) if model_type == "gemma" else 1.0,
        attn_scale=float(pre_attn) ** -0.5,
        sliding_window=int(window) if use_window else -1,
        tied_embeddings=bool(_get(config, "tie_word_embeddings", default=True)),
    )


def _lin(sd: StateDict, prefix: str) -> Linear:
    return Linear(sd[prefix + ".weight"], sd.get(prefix + ".bias"))


def _cat(*linears: Linear) -> Linear:
    weight = np.concatenate([lin.weight for lin in linears], axis=0)
    if all(lin.bias is None for lin in linears):
        return Linear(weight)
    biases = [lin.bias if lin.bias is not None else np.zeros(lin.weight.shape[0], weight.dtype) for lin in linears]
    return Linear(weight, np.concatenate(biases))


def _rope(model) -> tuple[np.ndarray, float]:
    """inv_freq from the PyTorch module itself, so every rope_type transformers knows is right."""
    rotary = model.model.rotary_emb
    return rotary.inv_freq.detach().float().numpy(), float(getattr(rotary, "attention_scaling", 1.0))


def _llama_like(model, sd: StateDict, config, model_type: str, *, norm_offset: float = 0.0) -> DecoderWeights:
    dims = _dims(config, model_type=model_type, norm="rms", positional="rope", gated=True)
    layers = []
    for i in range(dims.num_layers):
        p = f"model.layers.{i}."
        if p + "self_attn.qkv_proj.weight" in sd:  # phi3 ships them fused already
            qkv = _lin(sd, p + "self_attn.qkv_proj")
            up = _lin(sd, p + "mlp.gate_up_proj")
        else:
            qkv = _cat(*(_lin(sd, p + f"self_attn.{n}_proj") for n in "qkv"))
            up = _cat(_lin(sd, p + "mlp.gate_proj"), _lin(sd, p + "mlp.up_proj"))
        layers.append(
            LayerWeights(
                attn_norm=Norm(sd[p + "input_layernorm.weight"] + norm_offset),
                qkv=qkv,
                o=_lin(sd, p + "self_attn.o_proj"),
                mlp_norm=Norm(sd[p + "post_attention_layernorm.weight"] + norm_offset),
                up=up,
                down=_lin(sd, p + "mlp.down_proj"),
            )
        )
    embed = sd["model.embed_tokens.weight"]
    lm_head = embed if dims.tied_embeddings else sd["lm_head.weight"]
    inv_freq, scaling = _rope(model)
    return DecoderWeights(
        dims=dims,
        embed=embed,
        pos_embed=None,
        layers=layers,
        final_norm=Norm(sd["model.norm.weight"] + norm_offset),
        lm_head=lm_head,
        inv_freq=inv_freq,
        rope_scaling=scaling,
    )


def _gpt2(model, sd: StateDict, config) -> DecoderWeights:
    dims = _dims(config, model_type="gpt2", norm="layer", positional="learned", gated=False)

    def conv1d(prefix: str) -> Linear:  # GPT-2's Conv1D stores (in, out)
        return Linear(np.ascontiguousarray(sd[prefix + ".weight"].T), sd[prefix + ".bias"])

    layers = []
    for i in range(dims.num_layers):
        p = f"transformer.h.{i}."
        layers.append(
            LayerWeights(
                attn_norm=Norm(sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]),
                qkv=conv1d(p + "attn.c_attn"),
                o=conv1d(p + "attn.c_proj"),
                mlp_norm=Norm(sd[p + "ln_2.weight"], sd[p + "ln_2.bias"]),
                up=conv1d(p + "mlp.c_fc"),
                down=conv1d(p + "mlp.c_proj"),
            )
        )
    embed = sd["transformer.wte.weight"]
    return DecoderWeights(
        dims=dims,
        embed=embed,
        pos_embed=sd["transformer.wpe.weight"],
        layers=layers,
        final_norm=Norm(sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]),
        lm_head=embed if dims.tied_embeddings else sd["lm_head.weight"],
        inv_freq=None,
        rope_scaling=1.0,
    )


Extractor = Callable[[object, StateDict, object], DecoderWeights]

ARCHITECTURES: dict[str, Extractor] = {
    "gpt2": _gpt2,
    "llama": lambda m, sd, c: _llama_like(m, sd, c, "llama"),
    "mistral": lambda m, sd, c: _llama_like(m, sd, c, "mistral"),
    "qwen2": lambda m, sd, c: _llama_like(m, sd, c, "qwen2"),
    "phi3": lambda m, sd, c: _llama_like(m, sd, c, "phi3"),
    # Gemma's RMSNorm scales by (1 + weight).
    "gemma": lambda m, sd, c: _llama_like(m, sd, c, "gemma", norm_offset=1.0),
}


def check_supported(model_type: str) -> None:
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )


def extract_weights(model) -> DecoderWeights:
    """Reduce a transformers causal LM (PyTorch) to the builder's uniform weights (float32 numpy)."""
    config = model.config
    check_supported(config.model_type)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
        raise UnsupportedModelError(
            f"rope_type {rope.get('rope_type')!r} changes with sequence length and is not supported yet; "
            "supported: default, linear, llama3, yarn"
        )
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return ARCHITECTURES[config.model_type](model, sd, config)
