"""Build a Hugging Face ``tokenizers.Tokenizer`` from GGUF metadata that tokenizes as llama.cpp does.

Why not ``transformers``' own GGUF conversion: for SmolLM2 it makes ``<|im_start|>`` both BOS
and EOS and ignores llama.cpp's pre-tokenizer (``tokenizer.ggml.pre``), so digits are grouped
and ids differ from what the model was trained and quantized with. Here the pre-tokenizer is
mapped from llama.cpp's own table (``src/llama-vocab.cpp``: ``llm_tokenizer_bpe`` regexes and the
``tokenizer_pre`` -> pre-type switch), and special-token / BOS handling follows llama.cpp's
loader. Two vocabulary kinds: byte-level BPE (``tokenizer.ggml.model == "gpt2"``) and SentencePiece
(``"llama"``: Llama 2, Mistral, Gemma, Phi-3), which llama.cpp tokenizes by merging the pair whose
merged piece scores highest, falling back to ``<0xXX>`` byte tokens, and (``add_space_prefix``)
with a space before the text and after every special token.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from onnxllm.errors import InvalidPackageError, UnsupportedModelError

log = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType); kept literal so reading needs no enum lookups.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"  # SentencePiece's visible space

# The regexes llama.cpp uses for each pre-tokenizer family (llama-vocab.cpp, llm_tokenizer_bpe).
# The llama3/qwen2 ones are llama.cpp's "adapted" forms of the tokenizer.json regexes
# ((?i:'s|...) spelled out as '[sS]|...); Oniguruma accepts both, and they are equivalent.
_LLAMA3_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreSpec:
    family: str  # "gpt2" | "digits+gpt2" | "regex"
    regex: str | None = None
    ignore_merges: bool = False  # llama.cpp: a whole pre-token found in the vocab wins over merges
    add_bos: bool = False  # llama.cpp's default before tokenizer.ggml.add_bos_token overrides it
    clean_spaces: bool = True  # llama.cpp's clean_spaces, only used when decoding


_GPT2 = _PreSpec("gpt2")
_DIGITS_GPT2 = _PreSpec("digits+gpt2")  # "\p{N}" split first, then the GPT-2 regex
_LLAMA3 = _PreSpec("regex", _LLAMA3_RE, ignore_merges=True, add_bos=True)
_SPM = _PreSpec("spm", add_bos=True, clean_spaces=False)  # SentencePiece: llama.cpp adds BOS by default

# tokenizer.ggml.pre -> spec. Only names whose llama.cpp behaviour is reproduced exactly by a
# tokenizers pipeline; anything else raises rather than silently tokenizing differently.
_PRE_TOKENIZERS: dict[str, _PreSpec] = {
    **dict.fromkeys(["default", "gpt-2", "phi-2", "mpt", "olmo", "exaone4"], _GPT2),
    **dict.fromkeys(["starcoder", "refact", "codeshell", "exaone", "minerva-7b"], _DIGITS_GPT2),
    "smollm": _PreSpec("digits+gpt2", clean_spaces=False),
    "command-r": _PreSpec("digits+gpt2", clean_spaces=False),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3"], _LLAMA3),
    **dict.fromkeys(["dbrx", "smaug-bpe"], _PreSpec("regex", _LLAMA3_RE)),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _PreSpec("regex", _QWEN2_RE, clean_spaces=False)),
    "stablelm2": _PreSpec("regex", _QWEN2_RE),
}


@dataclass(frozen=True)
class GGUFTokenizerInfo:
    """A tokenizer rebuilt from GGUF metadata, plus what tokenizer_config.json needs."""

    tokenizer: tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None  # tokenizer.chat_template from the GGUF metadata
    special_tokens: dict[str, str]  # {"bos_token": ..., "eos_token": ...} for special_tokens_map.json
    # Extras (defaulted so the seven fields above keep their positions):
    add_eos_token: bool = False
    model_max_length: int | None = None  # <arch>.context_length
    clean_up_tokenization_spaces: bool = False
    end_of_turn_ids: tuple[int, ...] = ()  # tokenizer.ggml.eot_token_id / eom_token_id: also stop generation
    kind: str = "gpt2"  # tokenizer.ggml.model: gpt2 (byte-level BPE) | llama (SentencePiece)


def _open(path: Path):
    from .gguf_model import open_reader  # parsed once per process (the exporter reads the file again)

    return open_reader(path)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _build_pre_tokenizer(spec: _PreSpec):
    if spec.family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if spec.family == "digits+gpt2":
        # Every digit alone first (llama.cpp's "\p{N}" pass), then the GPT-2 regex + byte map.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(spec.regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece loop (llm_tokenizer_spm): a pair of pieces
    merges when the joined text is a normal/user-defined token, the highest-scoring joined piece first
    (ties: the lower id, which SentencePiece scores no lower)."""
    piece = {t: i for i, t in enumerate(tokens) if types[i] in (_NORMAL, _USER_DEFINED, _UNUSED)}
    found = []
    for text, i in piece.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in piece and right in piece:
                found.append((-scores[i], i, piece[left], piece[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _spm_tokenizer(path: Path, tokens: list[str], scores: list[float], types: list[int], unk_id: int | None,
                   add_space_prefix: bool) -> tokenizers.Tokenizer:
    """SentencePiece as llama.cpp runs it: spaces as U+2581, a space before every stretch of text that
    starts the input or follows a special token (add_space_prefix), piece merges by score, byte fallback."""
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[unk_id] if unk_id is not None else None
    try:
        bpe = models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True,
                         byte_fallback=True)
    except Exception as e:
        raise InvalidPackageError(f"{path}: inconsistent SentencePiece vocabulary: {e}") from e
    tok = tokenizers.Tokenizer(bpe)
    # A normalizer, not Metaspace: Metaspace skips its prefix when the text already starts with a space,
    # llama.cpp does not (" a" -> "▁▁a"). Added tokens are cut out first, so each stretch is prefixed.
    steps = [normalizers.Prepend(_SPACE)] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return tok


def _token_id(reader, key: str, n_vocab: int) -> int | None:
    value = _field(reader, key)
    # llama.cpp ignores an out-of-range id (with a warning); so do we.
    if value is None or not 0 <= int(value) < n_vocab:
        return None
    return int(value)


def read_gguf_tokenizer(path: str | os.PathLike) -> GGUFTokenizerInfo:
    """Read a GGUF file's tokenizer metadata and build an equivalent ``tokenizers.Tokenizer``.

    The result encodes text to the same ids as llama.cpp's ``llama_tokenize(add_special=...,
    parse_special=True)``: control tokens are special added tokens, user-defined tokens are plain
    added tokens, and BOS/EOS are added by the post-processor only when llama.cpp would add them.

    Raises ModelNotFoundError (no such file), InvalidPackageError (not a GGUF file, or broken
    tokenizer metadata) or UnsupportedModelError (a tokenizer model or pre-tokenizer not handled).
    """
    path = Path(path)
    reader = _open(path)
    try:
        model_kind = _field(reader, "tokenizer.ggml.model")
        if model_kind is None:
            raise InvalidPackageError(f"{path} has no tokenizer metadata (tokenizer.ggml.model).")
        if model_kind not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"{path}: tokenizer model {model_kind!r} is not supported; supported: byte-level BPE ('gpt2') "
                "and SentencePiece ('llama'). Use the model's original Hugging Face tokenizer instead."
            )
        pre_name = _field(reader, "tokenizer.ggml.pre") or "default"  # llama.cpp's fallback too
        spec = _PRE_TOKENIZERS.get(pre_name) if model_kind == "gpt2" else _SPM
        if spec is None:
            raise UnsupportedModelError(
                f"{path}: llama.cpp pre-tokenizer {pre_name!r} is not supported; supported: "
                f"{', '.join(sorted(_PRE_TOKENIZERS))}."
            )
        tokens = list(_field(reader, "tokenizer.ggml.tokens") or [])
        merges_raw = _field(reader, "tokenizer.ggml.merges")
        scores = _field(reader, "tokenizer.ggml.scores")
        if not tokens or (model_kind == "gpt2" and merges_raw is None):
            raise InvalidPackageError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing.")
        if model_kind == "llama" and (scores is None or len(scores) < len(tokens)):
            raise InvalidPackageError(
                f"{path}: a SentencePiece vocabulary needs tokenizer.ggml.scores for every token."
            )
        types = list(_field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
        if len(types) < len(tokens):
            raise InvalidPackageError(f"{path}: fewer token types ({len(types)}) than tokens ({len(tokens)}).")

        vocab: dict[str, int] = {}
        for i, text in enumerate(tokens):
            text = text or f"[EMPTY_{i}]"  # what llama.cpp does with an empty token
            if text in vocab:  # llama.cpp refuses these too; ids would silently shift otherwise
                raise InvalidPackageError(f"{path}: duplicate token {text!r} (ids {vocab[text]} and {i}).")
            vocab[text] = i
            tokens[i] = text
        merges = []
        for m in merges_raw or []:
            cut = m.find(" ", 1)  # llama.cpp splits a merge at the first space after position 0
            if cut < 0:
                raise InvalidPackageError(f"{path}: malformed BPE merge {m!r}.")
            merges.append((m[:cut], m[cut + 1 :]))

        n = len(tokens)
        bos_id = _token_id(reader, "tokenizer.ggml.bos_token_id", n)
        eos_id = _token_id(reader, "tokenizer.ggml.eos_token_id", n)
        pad_id = _token_id(reader, "tokenizer.ggml.padding_token_id", n)
        unk_id = _token_id(reader, "tokenizer.ggml.unknown_token_id", n)
        eot_ids = tuple(i for i in (_token_id(reader, "tokenizer.ggml.eot_token_id", n),
                                    _token_id(reader, "tokenizer.ggml.eom_token_id", n)) if i is not None)
        add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", spec.add_bos))
        add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
        add_space_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
        chat_template = _field(reader, "tokenizer.chat_template")
        arch = _field(reader, "general.architecture")
        ctx = _field(reader, f"{arch}.context_length") if arch else None
    except (InvalidPackageError, UnsupportedModelError):
        raise
    except Exception as e:  # a field of the wrong type, undecodable strings, ...
        raise InvalidPackageError(
            f"{path} is not a valid GGUF file ({type(e).__name__}): broken tokenizer metadata: {e}"
        ) from e

    if model_kind == "llama":
        tok = _spm_tokenizer(path, tokens, [float(x) for x in scores], types, unk_id, add_space_prefix)
    else:
        try:
            bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges, fuse_unk=False)
        except Exception as e:  # e.g. a merge whose parts or result are not in the vocab
            raise InvalidPackageError(f"{path}: inconsistent BPE vocab/merges: {e}") from e
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = _build_pre_tokenizer(spec)
        tok.decoder = decoders.ByteLevel()

    # llama.cpp's tokenizer_st_partition (parse_special=True) cuts out CONTROL, USER_DEFINED and
    # UNKNOWN tokens before BPE; registering them as added tokens gives the same split. Only
    # CONTROL/UNKNOWN are "special" (skipped on decode). A NORMAL-typed bos/eos is deliberately
    # not added: llama.cpp would BPE its text, not match it.
    added = [
        AddedToken(tokens[i], special=t != _USER_DEFINED, normalized=False)
        for i, t in enumerate(types[:n])
        if t in (_CONTROL, _USER_DEFINED, _UNKNOWN)
    ]
    tok.add_tokens(added)

    # ByteLevel keeps offsets byte-level-aware; the template adds BOS/EOS only when llama.cpp would.
    steps = [processors.ByteLevel(trim_offsets=False)] if model_kind == "gpt2" else []
    if (add_bos and bos_id is not None) or (add_eos and eos_id is not None):
        pre = [tokens[bos_id]] if add_bos and bos_id is not None else []
        post = [tokens[eos_id]] if add_eos and eos_id is not None else []
        ids = {t: vocab[t] for t in pre + post}
        steps.append(
            processors.TemplateProcessing(
                single=" ".join(pre + ["$A"] + post),
                pair=" ".join(pre + ["$A"] + post + pre + ["$B:1"] + post),
                special_tokens=list(ids.items()),
            )
        )
    if steps:
        tok.post_processor = processors.Sequence(steps) if len(steps) > 1 else steps[0]

    special = {
        name: tokens[i]
        for name, i in (("bos_token", bos_id), ("eos_token", eos_id), ("unk_token", unk_id), ("pad_token", pad_id))
        if i is not None
    }
    return GGUFTokenizerInfo(
        tokenizer=tok,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        add_bos_token=add_bos,
        chat_template=chat_template or None,
        special_tokens=special,
        add_eos_token=add_eos,
        model_max_length=int(ctx) if ctx else None,
        clean_up_tokenization_spaces=spec.clean_spaces,
        end_of_turn_ids=tuple(i for i in eot_ids if i != eos_id),
        kind=model_kind,
    )


def write_tokenizer_files(info: GGUFTokenizerInfo, out_dir) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and, when the GGUF
    has one, chat_template.jinja into ``out_dir`` (created if needed); return the names written.

    tokenizer_config.json names the bos/eos/pad/unk token strings, add_bos_token/add_eos_token,
    model_max_length (when known) and tokenizer_class "PreTrainedTokenizerFast", so both
    ``tokenizers.Tokenizer.from_file`` and ``transformers.AutoTokenizer`` load the same tokenizer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info.tokenizer.save(str(out / "tokenizer.json"))
    written = ["tokenizer.json"]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **info.special_tokens,
        "add_bos_token": info.add_bos_token,
        "add_eos_token": info.add_eos_token,
        "clean_up_tokenization_spaces": info.clean_up_tokenization_spaces,
    }
    if info.model_max_length:
        config["model_max_length"] = info.model_max_length
    files = {"tokenizer_config.json": config, "special_tokens_map.json": dict(info.special_tokens)}
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(name)
    if info.chat_template:
        (out / "chat_template.jinja").write_text(info.chat_template, encoding="utf-8")
        written.append("chat_template.jinja")
    return written
