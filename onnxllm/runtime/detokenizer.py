"""Incremental (streaming) detokenization that is safe for UTF-8 split across tokens.

Byte-level BPE tokens can end in the middle of a multi-byte character; decoding
such a prefix yields U+FFFD. The detokenizer keeps two offsets into the token
ids (the TGI / mlx-lm scheme):

* ``prefix_offset``: start of a short window of already-emitted tokens that is
  decoded again for context (decoders such as Metaspace or WordPiece treat the
  first token of a call specially, so both decodes must start at the same token);
* ``read_offset``: the end of what has been emitted.

Each ``add`` decodes ``ids[prefix_offset:]`` and ``ids[prefix_offset:read_offset]``
and emits the difference unless the text still ends in U+FFFD (an incomplete
character, held back until it completes or ``flush`` is called). The window is
a handful of tokens, so the cost of a token does not grow with the sequence.

Exactness (deltas + flush == full decode) holds for byte-level (GPT-2 style)
decoders for any id sequence, and for other decoders whenever the text is valid
UTF-8. The one known gap: a ``ByteFallback`` decoder renders a whole run of byte
tokens as U+FFFD once the run is invalid, so an ASCII byte token already emitted
before garbage bytes shows as itself here and as U+FFFD in a full decode.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StreamingDetokenizer"]

_REPLACEMENT = "\ufffd"

# After this many held-back tokens (only reachable with invalid byte soup), look
# for a clean split so the window cannot grow without bound.
_MAX_PENDING = 16


class StreamingDetokenizer:
    """Turn a stream of token ids into text deltas.

    The concatenation of every ``add`` result and the final ``flush`` equals
    ``tokenizer.decode(all_ids, skip_special_tokens=skip_special_tokens)``.
    ``tokenizer`` is a ``tokenizers.Tokenizer`` (anything with a compatible
    ``decode(ids, skip_special_tokens=...)`` works).
    """

    __slots__ = ("_tokenizer", "_skip_special", "_ids", "_prefix_offset", "_read_offset", "_chunks", "_text")

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._chunks: list[str] = []
        self._text: str | None = ""

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the deltas returned)."""
        if self._text is None:
            self._text = "".join(self._chunks)
            self._chunks = [self._text]
        return self._text

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Every token id added so far."""
        return tuple(self._ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        ids = self._ids[start:end] if end is not None else self._ids[start:]
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
            self._text = None
        return delta

    def add(self, token_id: int) -> str:
        """Append one token id; return the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return self._emit(delta)
        if len(self._ids) - self._read_offset > _MAX_PENDING:
            return self._emit(self._split_long_window(prefix_text, new_text))
        return ""

    def _split_long_window(self, prefix_text: str, new_text: str) -> str:
        # Emit everything but the last token when the split before it is clean: decoding
        # the two halves separately gives the same text as decoding them together, so no
        # character straddles it. With byte-level decoding an incomplete character that the
        # last token continues always merges differently, so this never cuts one in half.
        last = len(self._ids) - 1
        head = self._decode(self._prefix_offset, last)
        tail = self._decode(last)
        if not tail or head + tail != new_text or not head.startswith(prefix_text):
            return ""
        self._prefix_offset = self._read_offset = last
        return head[len(prefix_text) :]

    def flush(self) -> str:
        """Return any held-back text (e.g. a trailing incomplete character as U+FFFD).

        Call it once at the end of the stream; ``add`` after ``flush`` starts a fresh window.
        """
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        if len(new_text) > len(prefix_text):
            return self._emit(new_text[len(prefix_text) :])
        return ""
