"""A GGUF file -> a transformers config and state dict, read with gguf.GGUFReader, not transformers' loader.

Why not `from_pretrained(gguf_file=...)`: it reads some families wrong (FACTS.md: SmolLM2's RoPE base
in 4.57, the tokenizer in every version) and loads every tensor twice. Here every hyperparameter
comes from the GGUF's own metadata (`<arch>.context_length`, `.rope.freq_base`, ...), every tensor
is dequantized once by `gguf.quants.dequantize` (the reference the block import is checked against),
and the llama.cpp conventions are undone as its converter (convert_hf_to_gguf.py) applied them:
attn_q/attn_k rows permuted for `llama`, Gemma's norm weights stored as 1 + w.

The per-architecture facts are data (`GGUF_ARCHITECTURES`): which transformers model_type, which
metadata keys are required, which tensor names map to which parameter.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidPackageError, ModelNotFoundError, UnsupportedModelError
from .architectures import REGISTRY

# Types the reader dequantizes (gguf.GGMLQuantizationType names); IQ*/TQ* are refused by name.
READABLE_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# Tensor names every decoder shares: GGUF suffix (after blk.N.) -> transformers suffix (after model.layers.N.).
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one GGUF `general.architecture` maps onto a transformers model_type."""

    model_type: str
    permute_qk: bool = False  # llama.cpp permuted attn_q / attn_k rows for its rotary layout
    norm_plus_one: bool = False  # norms stored as 1 + w (Gemma)
    layer_tensors: dict[str, str] = field(default_factory=dict)  # overrides/additions to _LAYER_TENSORS
    config: dict = field(default_factory=dict)  # fixed config entries of the family
    # metadata key (after "<arch>.") -> config key, beyond the common ones
    extra_keys: dict[str, str] = field(default_factory=dict)


_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 norm both sides of attention and MLP; llama.cpp's ffn_norm is the pre-MLP one there.
_SANDWICH = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_SOFTCAPS = {"attn_logit_softcapping": "attn_logit_softcapping",
             "final_logit_softcapping": "final_logit_softcapping"}

GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    # Llama 2/3, SmolLM2, Mistral (llama.cpp writes Mistral as "llama" too).
    "llama": GGUFArchitecture("llama", permute_qk=True),
    "qwen2": GGUFArchitecture("qwen2"),
    "gemma": GGUFArchitecture("gemma", norm_plus_one=True, config={"hidden_activation": "gelu_pytorch_tanh"}),
    "phi3": GGUFArchitecture("phi3", layer_tensors={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}),
    "qwen3": GGUFArchitecture("qwen3", layer_tensors=_QK_NORMS),
    "gemma2": GGUFArchitecture("gemma2", norm_plus_one=True, layer_tensors=_SANDWICH, extra_keys=_SOFTCAPS,
                               config={"hidden_activation": "gelu_pytorch_tanh"}),
}
_FLOAT_KEYS = {"rms_norm_eps", "rope_theta", "attn_logit_softcapping", "final_logit_softcapping"}

# Metadata (after "<arch>.") -> config key, and whether a GGUF must have it.
_COMMON_KEYS = {
    "embedding_length": ("hidden_size", True),
    "block_count": ("num_hidden_layers", True),
    "feed_forward_length": ("intermediate_size", True),
    "attention.head_count": ("num_attention_heads", True),
    "context_length": ("max_position_embeddings", True),
    "attention.head_count_kv": ("num_key_value_heads", False),
    "attention.layer_norm_rms_epsilon": ("rms_norm_eps", False),
    "attention.key_length": ("head_dim", False),
    "rope.freq_base": ("rope_theta", False),
    "attention.sliding_window": ("sliding_window", False),
}


def open_reader(path: str | os.PathLike):
    """The file's gguf.GGUFReader, parsed once per process while the file is unchanged.

    Parsing the metadata costs seconds (a 49,152-token vocabulary is ~150,000 small arrays), and one
    export used to parse the file five times (source check, tokenizer, weights, manifest; then the
    quantizer): 40% of SmolLM2's export time. The reader maps the file; it holds no tensor data."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    st = path.stat()
    return _parsed(str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _parsed(path: str, _inode: int, _size: int, _mtime_ns: int):
    import gguf

    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... on garbage
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InvalidPackageError(f"{Path(path).name} is not a valid GGUF file ({type(exc).__name__}: {first}); "
                                  "re-download it or point at another file") from None



def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tensor_types(reader) -> dict[str, int]:
    """Tensor counts per GGUF type name, sorted by name."""
    import gguf

    counts: dict[str, int] = {}
    for t in reader.tensors:
        name = gguf.GGMLQuantizationType(t.tensor_type).name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def architecture_of(reader, path: Path) -> tuple[str, GGUFArchitecture]:
    arch = _field(reader, "general.architecture")
    if not arch:
        raise InvalidPackageError(f"{path.name} has no general.architecture metadata; it is not a model GGUF")
    entry = GGUF_ARCHITECTURES.get(arch)
    if entry is None or entry.model_type not in REGISTRY:
        known = sorted(a for a, e in GGUF_ARCHITECTURES.items() if e.model_type in REGISTRY)
        raise UnsupportedModelError(f"{path.name}: GGUF architecture {arch!r} is not supported; "
                                    f"supported: {', '.join(known)}")
    return arch, entry


def check_gguf_file(path: str | os.PathLike) -> dict[str, int]:
    """Cheap checks before any weight is read: the file parses, every tensor type is one we read, the
    architecture is in the registry, the required metadata is there. Returns the type counts."""
    import gguf

    path = Path(path)
    reader = open_reader(path)
    for t in reader.tensors:
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        if kind not in READABLE_TYPES:
            raise UnsupportedModelError(
                f"{path.name}: tensor {t.name} has GGUF type {kind}, which onnxllm does not read; "
                f"supported: {', '.join(READABLE_TYPES)} (requantize the file with llama.cpp to one of them)")
    arch, _ = architecture_of(reader, path)
    for key, (_, required) in _COMMON_KEYS.items():
        if required and reader.fields.get(f"{arch}.{key}") is None:
            raise InvalidPackageError(f"{path.name}: metadata key {arch}.{key} is missing; the file is incomplete")
    if "token_embd.weight" not in {t.name for t in reader.tensors}:
        raise InvalidPackageError(f"{path.name} has no token_embd.weight tensor; the file is incomplete")
    return tensor_types(reader)


def gguf_config(reader, path: Path, *, bos: int | None = None, eos: int | None = None):
    """A transformers config built from the GGUF's metadata alone."""
    from transformers import AutoConfig

    arch, entry = architecture_of(reader, path)
    kwargs: dict = dict(entry.config)
    for key, (name, required) in {**_COMMON_KEYS, **{k: (v, False) for k, v in entry.extra_keys.items()}}.items():
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            if required:
                raise InvalidPackageError(f"{path.name}: metadata key {arch}.{key} is missing; the file is incomplete")
            continue
        kwargs[name] = float(value) if name in _FLOAT_KEYS else int(value)
    tensors = {t.name: t for t in reader.tensors}
    kwargs["vocab_size"] = int(tensors["token_embd.weight"].shape[1])
    kwargs["tie_word_embeddings"] = "output.weight" not in tensors
    kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
    kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    rotary = _field(reader, f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != kwargs["head_dim"]:
        raise UnsupportedModelError(f"{path.name}: partial rotary ({rotary} of {kwargs['head_dim']} dims) "
                                    "is not supported yet")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in tensors or "rope_factors_long.weight" in tensors:
        raise UnsupportedModelError(f"{path.name}: per-frequency RoPE factors (Llama 3.1 / Phi-3 long-context "
                                    "scaling) are not supported yet")
    if scaling and scaling != "none":
        factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
        if scaling != "linear":
            raise UnsupportedModelError(
                f"{path.name}: RoPE scaling {scaling!r} is not supported yet; supported: linear"
            )
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    if entry.model_type == "gemma2":
        # llama.cpp (llama-model.cpp) scales queries by 1/sqrt(hidden/heads) for the 27B (46 layers) and by
        # 1/sqrt(head_dim) otherwise: the GGUF has no key for it, so the same rule applies here.
        heads_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        kwargs["query_pre_attn_scalar"] = heads_dim if kwargs["num_hidden_layers"] == 46 else kwargs["head_dim"]
    if entry.model_type == "phi3":
        kwargs["original_max_position_embeddings"] = int(
            _field(reader, f"{arch}.rope.scaling.original_context_length", kwargs["max_position_embeddings"]))
    if bos is not None:
        kwargs["bos_token_id"] = bos
    if eos is not None:
        kwargs["eos_token_id"] = eos
    return AutoConfig.for_model(entry.model_type, **kwargs)


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's permute() of attn_q / attn_k rows (transformers' own inverse)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str, entry: GGUFArchitecture) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight | bias
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk":
        table = {**_LAYER_TENSORS, **entry.layer_tensors}
        if parts[2] in table:
            return f"model.layers.{parts[1]}.{table[parts[2]]}.{suffix}"
    return None


def read_state_dict(reader, path: Path, config) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its transformers name, llama.cpp's layout undone."""
    import gguf

    _, entry = architecture_of(reader, path)
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = _hf_name(t.name, entry)
        if name is None:
            raise UnsupportedModelError(f"{path.name}: tensor {t.name} has no place in a {entry.model_type} model")
        w = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(t.tensor_type))
        w = np.asarray(w, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if entry.permute_qk and t.name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
            w = _reverse_permute(w, heads)
        if entry.norm_plus_one and t.name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        out[name] = w if w.flags.writeable and w.flags.c_contiguous else np.array(w, np.float32, order="C")
    return out


def load_gguf_model(path: str | os.PathLike, *, bos: int | None = None, eos: int | None = None):
    """(transformers model in eval mode, GGUF type counts): the GGUF's weights in PyTorch, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    types = check_gguf_file(path)
    reader = open_reader(path)
    config = gguf_config(reader, path, bos=bos, eos=eos)
    state = read_state_dict(reader, path, config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = set(model.state_dict())
    missing = expected - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing:
        raise InvalidPackageError(f"{path.name} lacks tensors for {len(missing)} weights, e.g. {sorted(missing)[0]}")
    extra = set(state) - expected
    if extra:
        raise UnsupportedModelError(f"{path.name}: tensor {sorted(extra)[0]} has no place in a "
                                    f"{config.model_type} model with this metadata")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, value in state.items():
        if tuple(value.shape) != shapes[key]:
            raise InvalidPackageError(f"{path.name}: {key} is {tuple(value.shape)}, the metadata implies "
                                      f"{shapes[key]}")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), types


__all__ = ["GGUF_ARCHITECTURES", "READABLE_TYPES", "check_gguf_file", "gguf_config", "load_gguf_model",
           "open_reader", "read_state_dict", "tensor_types"]
