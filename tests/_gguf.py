"""GGUF files written in the tests with gguf's GGUFWriter: random valid blocks of every type, a tiny
llama whose weights are such blocks, and a tiny SentencePiece vocabulary.

Also imported by scripts/make_gguf_fixtures.py, which records llama.cpp's ids for the same vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The texts whose ids are compared with llama.cpp's (tests/fixtures/gguf_tokenizer_ids.json).
TEXTS = [
    "Hello world",
    "def add(a, b):\n    return a + b  # sum\n",
    "emoji: \U0001F600\U0001F44D\U0001F3FD and \u2764\ufe0f",
    "\u4e2d\u6587\u5b57\u7b26 \u65e5\u672c\u8a9e\u306e\u6587",
    "digits 1234567890 and 3.14159",
    "   leading spaces and\ttabs",
    " one leading space",
    "<|user|>Hi there</s><|assistant|>",
    "the theme in the thin",
]

# Per type: (bytes per block, weights per block, byte offsets of its float16 scale fields, their size).
_F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
# Scale magnitudes that give weights of roughly N(0, 0.05) for each type's level and sub-scale ranges.
_SCALE = {"Q4_0": 0.01, "Q4_1": 0.01, "Q5_0": 0.005, "Q5_1": 0.005, "Q8_0": 6e-4, "Q2_K": 2e-3, "Q3_K": 8e-4,
          "Q4_K": 3e-4, "Q5_K": 1.5e-4, "Q6_K": 3e-5}


def random_blocks(kind: str, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid GGUF blocks (rows, row_bytes) of `kind`: random bits, finite float16 scales."""
    import gguf

    if kind in ("F32", "F16", "BF16"):
        w = rng.normal(0, 0.05, (rows, k)).astype(np.float32)
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])
    size, per = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1], \
        gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    raw = rng.integers(0, 256, (rows, k // per, size), dtype=np.uint8)
    if kind not in _F16_FIELDS:  # a type onnxllm refuses (IQ*): its bytes only need the right size
        return np.zeros((rows, k // per * size), np.uint8)
    for at in _F16_FIELDS[kind]:
        d = np.abs(rng.normal(_SCALE[kind], _SCALE[kind] / 3, raw.shape[:2])).astype(np.float16)
        raw[..., at:at + 2] = d[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _byte_level_vocab(n: int) -> tuple[list[str], list[int], list[str]]:
    """256 byte-level symbols, an EOS, a few merges, padded to n tokens."""
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n", "o u"]
    tokens += ["<|endoftext|>"] + [m.replace(" ", "") for m in merges]
    types = [1] * 256 + [3] + [1] * len(merges)
    tokens += [f"[PAD{i}]" for i in range(n - len(tokens))]
    types += [5] * (n - len(types))
    return tokens, types, merges


def write_tiny_llama(path: Path, types: dict[str, str], *, seed: int = 0, hidden: int = 256, ff: int = 512,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 320, tied: bool = True,
                     arch: str = "llama", skip_keys: tuple[str, ...] = ()) -> Path:
    """A tiny random llama GGUF: `types` maps a tensor role (attn_q, ffn_down, token_embd, output, or
    'blk.1.attn_q' for one layer) to its GGUF type; norms are F32. Byte-level BPE vocabulary."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch=arch)
    keys = {
        "context_length": lambda: w.add_context_length(256),
        "embedding_length": lambda: w.add_embedding_length(hidden),
        "block_count": lambda: w.add_block_count(layers),
        "feed_forward_length": lambda: w.add_feed_forward_length(ff),
        "head_count": lambda: w.add_head_count(heads),
        "head_count_kv": lambda: w.add_head_count_kv(kv_heads),
    }
    for key, add in keys.items():
        if key not in skip_keys:
            add()
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(50000.0)
    w.add_rope_dimension_count(hidden // heads)
    tokens, token_types, merges = _byte_level_vocab(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_eos_token_id(256)
    w.add_bos_token_id(256)
    w.add_add_bos_token(False)
    head = hidden // heads
    shapes = {
        "attn_q": (heads * head, hidden),
        "attn_k": (kv_heads * head, hidden),
        "attn_v": (kv_heads * head, hidden),
        "attn_output": (hidden, heads * head),
        "ffn_gate": (ff, hidden),
        "ffn_up": (ff, hidden),
        "ffn_down": (hidden, ff),
    }

    def add(name: str, role: str, rows: int, k: int) -> None:
        kind = types.get(name.rsplit(".", 1)[0], types.get(role, "Q8_0"))
        raw = random_blocks(kind, rows, k, rng)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[kind])

    def norm(name: str) -> None:
        w.add_tensor(name, (1 + rng.normal(0, 0.1, hidden)).astype(np.float32))

    add("token_embd.weight", "token_embd", vocab, hidden)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        for role, (rows, k) in shapes.items():
            add(f"blk.{i}.{role}.weight", role, rows, k)
        norm(f"blk.{i}.ffn_norm.weight")
    norm("output_norm.weight")
    if not tied:
        add("output.weight", "output", vocab, hidden)
    _finish(w)
    return path


def spm_vocab(seed: int = 0) -> tuple[list[str], list[float], list[int]]:
    """A tiny SentencePiece vocabulary: unk, bos, eos, two chat tokens, 256 byte tokens, characters and
    pieces with distinct random scores (so the merge order is the scores', not the list's)."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    types = [2, 3, 3, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    chars = list("\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:#()+=_\u4e2d\u6587\u65e5")
    pieces = ["\u2581t", "he", "\u2581the", "in", "\u2581in", "er", "\u2581a", "an", "re", "on", "\u2581s", "or",
              "de", "ef", "\u2581def", "\u2581re", "tu", "rn", "turn", "\u2581return", "12", "123", "\u4e2d\u6587",
              "\u2581\u4e2d", "\u2581\u2581", "\u2581\u2581\u2581", "th", "\u2581th", "em", "eme", "\u2581H", "el",
              "ll", "llo", "\u2581Hello", "Hi", "\u2581w", "or", "ld", "\u2581world", "ad", "dd", "\u2581add"]
    seen = set(tokens)
    for p in chars + pieces:
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(1)
    n_special = 5 + 256
    scores = [0.0] * n_special + list(-rng.permutation(len(tokens) - n_special).astype(float) - 1.0)
    return tokens, scores, types


def write_spm_vocab(path: Path, *, add_space_prefix: bool = True, seed: int = 0) -> Path:
    """A vocabulary-only llama GGUF with a SentencePiece tokenizer (what llama.cpp's vocab_only loads)."""
    import gguf

    tokens, scores, types = spm_vocab(seed)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(add_space_prefix)
    _finish(w)
    return path
