"""Tiny random encoder checkpoints (BERT, RoBERTa, XLM-RoBERTa) with sentence-transformers files.

    from _tiny_encoder import make_tiny_encoder
    folder = make_tiny_encoder(tmp_path, "bert", pooling="mean", normalize=True)

BERT gets a WordPiece tokenizer over letters, digits and punctuation (lowercased, [CLS] ... [SEP]);
the RoBERTa family a byte-level BPE with <s> ... </s>. Hidden 64, 2 layers, 4 heads: exports in seconds.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

VOCAB_SIZE = 128
MAX_POSITIONS = 64  # usable tokens: 64 (BERT), 64 (RoBERTa family: positions start after padding_idx)
_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "type_vocab_size": 2, "vocab_size": VOCAB_SIZE}
_FAMILIES = {
    "bert": {"max_position_embeddings": MAX_POSITIONS, "pad_token_id": 0},
    "roberta": {"max_position_embeddings": MAX_POSITIONS + 2, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    "xlm-roberta": {"max_position_embeddings": MAX_POSITIONS + 2, "pad_token_id": 1, "bos_token_id": 0,
                    "eos_token_id": 2},
}


def _wordpiece():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + symbols
                                        + ["##" + c for c in string.ascii_lowercase + string.digits])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    assert len(vocab) <= VOCAB_SIZE
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_POSITIONS)


def _byte_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        if len(vocab) < VOCAB_SIZE:
            vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>",
                                   model_max_length=MAX_POSITIONS)


def make_tiny_encoder(tmp_path: Path, model_type: str = "bert", *, pooling: str | None = "mean",
                      normalize: bool = True, max_seq_length: int | None = None, seed: int = 0,
                      extra_modules: tuple[str, ...] = ()) -> Path:
    """A random-weight encoder checkpoint folder; pooling=None writes no sentence-transformers files."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type, **_CONFIG, **_FAMILIES[model_type])
    torch.manual_seed(seed)
    model = AutoModel.from_config(config).eval()
    with torch.no_grad():  # widen the ~N(0, 0.02) init so vectors differ between texts
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    folder = Path(tmp_path) / f"tiny-{model_type}-{pooling}-encoder"
    model.save_pretrained(str(folder), safe_serialization=True)
    (_wordpiece() if model_type == "bert" else _byte_bpe()).save_pretrained(str(folder))
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        modules += [{"idx": len(modules) + i, "name": str(len(modules) + i), "path": f"{len(modules) + i}_{m}",
                     "type": f"sentence_transformers.models.{m}"} for i, m in enumerate(extra_modules)]
        (folder / "modules.json").write_text(json.dumps(modules, indent=2))
        (folder / "1_Pooling").mkdir()
        keys = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                "lasttoken": "pooling_mode_lasttoken"}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 64, **{k: name == pooling for name, k in keys.items()}}))
        if max_seq_length:
            (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return folder
