"""A package's tokenizer: tokenizer.json read and checked against the model, special-token fields read."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidPackageError
from ..package import Manifest, safe_path


def load_tokenizer(root: Path, manifest: Manifest):
    from tokenizers import Tokenizer

    path = safe_path(root, manifest.tokenizer)
    if not path.is_file():
        raise InvalidPackageError(f"{root} has no {manifest.tokenizer}; the package is incomplete: re-export it")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise InvalidPackageError(f"{path} is not a valid tokenizer file: {str(exc)[:200]}") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > manifest.architecture.vocab_size:
        raise InvalidPackageError(
            f"the tokenizer has {size} tokens but the model has only {manifest.architecture.vocab_size} logits: "
            "tokenizer.json belongs to another model; restore the package's own tokenizer"
        )
    return tokenizer


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} (older files)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
