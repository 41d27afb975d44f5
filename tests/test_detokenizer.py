"""Tests for onnxllm.runtime.detokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from onnxllm.runtime.detokenizer import StreamingDetokenizer

CORPUS = [
    "你好世界，今天天气很好。",
    "中文和English混合 text 🙂🎉 emoji",
    "Grüße aus Köln — naïve café ☕",
    "日本語のテキストと한국어 텍스트 😀👍🏽",
    "hello world, the quick brown fox jumps over the lazy dog",
]
TEXTS = [
    "你好世界 🙂 hello",
    "🎉🎉 中文 emoji 😀👍🏽 test",
    "naïve café ☕ Köln — 한국어",
    "plain ascii only",
    "",
    " leading space and 𝄞 (4-byte) and \n newline",
]
SPECIAL = "<|endoftext|>"


def _byte_level_bpe() -> Tokenizer:
    """GPT-2 style: ByteLevel pre-tokenizer + decoder over the 256-byte alphabet."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[SPECIAL],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def _sentencepiece_bpe() -> Tokenizer:
    """Llama-2 style: Metaspace-ish normalizer, byte fallback, Replace/ByteFallback/Fuse/Strip decoder."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "el", "lo", "▁w", "or", "ld", "你", "好", "▁你"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "h"), ("e", "l"), ("l", "o"), ("▁", "w"), ("o", "r"), ("l", "d"), ("▁", "你")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


BYTE_LEVEL = _byte_level_bpe()
SENTENCEPIECE = _sentencepiece_bpe()


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> tuple[list[str], str]:
    detok = StreamingDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    assert detok.token_ids == tuple(ids)
    return deltas, "".join(deltas)


def test_tokenizer_splits_multibyte_characters():
    # Guard that the fixture really exercises the hard case: some token is not valid UTF-8 alone.
    ids = BYTE_LEVEL.encode("".join(TEXTS)).ids
    assert any("\ufffd" in BYTE_LEVEL.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_and_has_no_replacement_chars(text):
    ids = BYTE_LEVEL.encode(text).ids
    deltas, streamed = _stream(BYTE_LEVEL, ids)
    assert streamed == BYTE_LEVEL.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_character_is_held_back_until_complete():
    ids = BYTE_LEVEL.encode("a🙂").ids
    detok = StreamingDetokenizer(BYTE_LEVEL)
    deltas = [detok.add(i) for i in ids]
    assert deltas[0] == "a"
    assert "".join(deltas) == "a🙂"
    assert deltas[-1].endswith("🙂")
    assert detok.flush() == ""


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(skip):
    eot = BYTE_LEVEL.token_to_id(SPECIAL)
    ids = BYTE_LEVEL.encode("你好").ids + [eot] + BYTE_LEVEL.encode(" 🙂x").ids + [eot]
    _, streamed = _stream(BYTE_LEVEL, ids, skip_special_tokens=skip)
    assert streamed == BYTE_LEVEL.decode(ids, skip_special_tokens=skip)
    assert (SPECIAL in streamed) is (not skip)


def test_trailing_incomplete_character_is_flushed():
    ids = BYTE_LEVEL.encode("x🙂").ids
    detok = StreamingDetokenizer(BYTE_LEVEL)
    partial = "".join(detok.add(i) for i in ids[:-1])
    assert "\ufffd" not in partial
    tail = detok.flush()
    assert partial + tail == BYTE_LEVEL.decode(ids[:-1])
    assert tail.endswith("\ufffd")


def test_long_run_of_invalid_bytes_keeps_window_bounded_and_exact():
    single_bytes = [BYTE_LEVEL.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    # Byte tokens that are not valid UTF-8 on their own (lead and continuation bytes, 0xFF, ...).
    cont = sorted(i for i in single_bytes if BYTE_LEVEL.decode([i]) == "\ufffd")
    ids = (cont[:3] * 40) + BYTE_LEVEL.encode("ok 你好").ids + cont[:2] * 30
    detok = StreamingDetokenizer(BYTE_LEVEL)
    out = []
    for i in ids:
        out.append(detok.add(i))
        assert len(detok.token_ids) - detok._prefix_offset <= 24  # window stays small
    out.append(detok.flush())
    assert "".join(out) == BYTE_LEVEL.decode(ids)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, BYTE_LEVEL.get_vocab_size() - 1), max_size=80), st.booleans())
def test_random_ids_stream_equals_decode(ids, skip):
    _, streamed = _stream(BYTE_LEVEL, ids, skip_special_tokens=skip)
    assert streamed == BYTE_LEVEL.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([t for t in TEXTS + CORPUS if t]), min_size=1, max_size=4))
def test_valid_text_never_emits_replacement(parts):
    text = " ".join(parts)
    ids = BYTE_LEVEL.encode(text).ids
    deltas, streamed = _stream(BYTE_LEVEL, ids)
    assert streamed == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", ["hello world", "你好 world", "héllo 🙂 你好", " world hello"])
def test_sentencepiece_byte_fallback_stream(text):
    ids = [1] + SENTENCEPIECE.encode(text, add_special_tokens=False).ids + [2]
    for skip in (True, False):
        deltas, streamed = _stream(SENTENCEPIECE, ids, skip_special_tokens=skip)
        assert streamed == SENTENCEPIECE.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)
    assert SENTENCEPIECE.decode(ids) == text


def test_per_token_decode_window_is_bounded():
    calls: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return BYTE_LEVEL.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = BYTE_LEVEL.encode(" ".join(CORPUS) * 10).ids
    _, streamed = _stream(Counting(), ids)  # type: ignore[arg-type]
    assert streamed == BYTE_LEVEL.decode(ids)
    assert max(calls) <= 8  # never re-decodes the whole sequence



def _gpt2_byte_tokens() -> dict[int, int]:
    """Map each byte value to its single-byte token id (GPT-2's bytes_to_unicode table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {b: BYTE_LEVEL.token_to_id(c) for b, c in chars.items()}


BYTE_TOKEN = _gpt2_byte_tokens()
CONTINUATION = [BYTE_TOKEN[b] for b in range(0x80, 0xC0)]
LEAD = [BYTE_TOKEN[b] for b in range(0xC2, 0xF5)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.sampled_from(CONTINUATION), st.sampled_from(LEAD), st.sampled_from(sorted(BYTE_TOKEN.values()))),
        max_size=200,
    ),
    st.booleans(),
)
def test_random_byte_soup_stream_equals_decode(ids, skip):
    # Long stretches of incomplete/invalid UTF-8 exercise the bounded-window split.
    ids = [*ids, BYTE_LEVEL.token_to_id(SPECIAL)]
    _, streamed = _stream(BYTE_LEVEL, ids, skip_special_tokens=skip)
    assert streamed == BYTE_LEVEL.decode(ids, skip_special_tokens=skip)


def test_bytes_table_matches_tokenizer():
    assert BYTE_LEVEL.decode([BYTE_TOKEN[ord("A")]]) == "A"
    assert BYTE_LEVEL.decode([BYTE_TOKEN[0xE4], BYTE_TOKEN[0xBD], BYTE_TOKEN[0xA0]]) == "你"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="helowrd 你好é🙂\n中", max_size=30), st.booleans())
def test_sentencepiece_valid_text_property(text, skip):
    # Byte-fallback decoders turn a whole invalid byte run into U+FFFD, so exactness is
    # promised for valid UTF-8 output (what a real model's text is) with this decoder family.
    ids = [1, *SENTENCEPIECE.encode(text, add_special_tokens=False).ids, 2]
    deltas, streamed = _stream(SENTENCEPIECE, ids, skip_special_tokens=skip)
    assert streamed == SENTENCEPIECE.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)
