"""Tiny random models for tests: an HF checkpoint folder, and an exported onnxllm package.

    from _tiny import make_tiny_checkpoint, make_tiny_package
    pkg = make_tiny_package(tmp_path)                       # llama, 2 layers, hidden 64
    pkg = make_tiny_package(tmp_path, "qwen2", num_hidden_layers=1)

The tokenizer is a byte-level BPE with the 256 byte tokens and a few merges, so any text
(Hamlet included) tokenizes; the model's vocabulary is 320 (the extra ids are never produced).
head_dim is 16 everywhere: GroupQueryAttention on CPU needs a multiple of 16.
Exports take ~2 s each on 2 cores; cache them in a session fixture when several tests share one.
"""

from __future__ import annotations

from pathlib import Path

# Per model_type: a config small enough to export in seconds. Overrides win.
_DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256}
_CONFIGS: dict[str, dict] = {
    "llama": {**_DECODER, "rope_theta": 10000.0, "tie_word_embeddings": True},
    "mistral": {**_DECODER, "sliding_window": None, "tie_word_embeddings": False},
    "qwen2": {**_DECODER, "tie_word_embeddings": True},
    "phi3": {**_DECODER, "original_max_position_embeddings": 256, "tie_word_embeddings": False, "pad_token_id": 0},
    "gemma": {**_DECODER, "head_dim": 16, "tie_word_embeddings": True},
    "gpt2": {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 256, "tie_word_embeddings": True},
    "qwen3": {**_DECODER, "head_dim": 16, "tie_word_embeddings": True},
    "gemma2": {**_DECODER, "head_dim": 16, "tie_word_embeddings": True},
    "gemma3_text": {**_DECODER, "head_dim": 16, "tie_word_embeddings": True},
    "smollm3": {**_DECODER, "tie_word_embeddings": True, "pad_token_id": 0},
    "granite": {**_DECODER, "tie_word_embeddings": True},
    "olmo2": {**_DECODER, "tie_word_embeddings": False},
}
VOCAB_SIZE = 320
EOS = "<|endoftext|>"


def _tokenizer():
    """A byte-level BPE over the 256 byte symbols plus a handful of merges; id 256 is the EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("o", "u")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    assert len(vocab) <= VOCAB_SIZE
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None,
                                   model_max_length=256)


def make_tiny_checkpoint(tmp_path: Path, model_type: str = "llama", *, seed: int = 0, **overrides) -> Path:
    """A random-weight HF checkpoint folder (safetensors + fast tokenizer) under `tmp_path`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in _CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; known: {', '.join(sorted(_CONFIGS))}")
    kwargs = {**_CONFIGS[model_type], "vocab_size": VOCAB_SIZE, "eos_token_id": 256, "bos_token_id": 256,
              **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init is ~N(0, 0.02): widen it so logits differ between tokens
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    folder = Path(tmp_path) / f"tiny-{model_type}-ckpt"
    model.save_pretrained(str(folder), safe_serialization=True)
    _tokenizer().save_pretrained(str(folder))
    return folder


def make_tiny_package(tmp_path: Path, model_type: str = "llama", **config_overrides) -> Path:
    """Export a tiny random `model_type` model to an onnxllm package folder under `tmp_path`."""
    from onnxllm.exporter.export import ExportOptions, export

    ckpt = make_tiny_checkpoint(tmp_path, model_type, **config_overrides)
    out = Path(tmp_path) / f"tiny-{model_type}-pkg"
    export(ckpt, out, options=ExportOptions())
    return out
