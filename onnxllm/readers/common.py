"""What foreign folders share with Hugging Face's: tokenizer files, chat template, generation defaults, ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidPackageError
from ..package import FORMAT_VERSION, Architecture, Manifest, Variant, safe_path
from .graph import GraphFacts


def read_json(root: Path, name: str, *, required: bool = False) -> dict:
    path = safe_path(root, name)
    if not path.is_file():
        if required:
            raise InvalidPackageError(f"{root} has no {name}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise InvalidPackageError(f"{path} is not valid JSON ({exc}); re-download it") from None
    if not isinstance(data, dict):
        raise InvalidPackageError(f"{path} is not a JSON object")
    return data


def token_ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


@dataclass(frozen=True)
class TokenizerFacts:
    tokenizer: str
    add_bos_token: bool
    chat_template: str | None  # a file: .jinja (the text) or .json ({"chat_template": ...})


def tokenizer_facts(root: Path, bos_token_id: int | None) -> TokenizerFacts:
    """The tokenizer file (required), whether it adds BOS, and where the chat template is."""
    from tokenizers import Tokenizer

    path = safe_path(root, "tokenizer.json")
    if not path.is_file():
        raise InvalidPackageError(f"{root} has no tokenizer.json; onnxllm needs the model's fast tokenizer file "
                                  "beside the model (copy it from the model's repository)")
    config = read_json(root, "tokenizer_config.json")
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        # What the tokenizer's post-processor does, as transformers would run it.
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise InvalidPackageError(f"{path} is not a valid tokenizer file: {str(exc)[:200]}") from None
        with_special = tok.encode("a", add_special_tokens=True).ids
        add_bos = bos_token_id is not None and with_special[:1] == [bos_token_id] != tok.encode("a").ids[:1]
    template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        if safe_path(root, name).is_file():
            template = name
            break
    if template is None and isinstance(config.get("chat_template"), (str, list)):
        template = "tokenizer_config.json"
    return TokenizerFacts("tokenizer.json", add_bos, template)


def generation_defaults(do_sample: bool, temperature, top_k, top_p, repetition_penalty, max_new_tokens=None) -> dict:
    """The manifest's `generation` record from a folder's own settings (greedy unless it samples)."""
    out = {"temperature": float(temperature or 1.0) if do_sample else 0.0,
           "top_k": int(top_k or 0) if do_sample else 0, "top_p": float(top_p or 1.0) if do_sample else 1.0,
           "repetition_penalty": float(repetition_penalty or 1.0)}
    if isinstance(max_new_tokens, int) and max_new_tokens > 0:
        out["max_new_tokens"] = max_new_tokens
    return out


def variant_of(facts: GraphFacts, root: Path, reader: str) -> Variant:
    from ..package import onnx_bytes

    data = [p for p in safe_path(root, facts.file).parent.glob(Path(facts.file).name + "*") if p.is_file()]
    return Variant(file=facts.file, scheme=facts.scheme, dtype=facts.kv.dtype,
                   bytes=sum(p.stat().st_size for p in data) or onnx_bytes(safe_path(root, facts.file)),
                   method=facts.method(reader), io=facts.io, kv_cache=facts.kv)


def foreign_manifest(*, layout: str, root: Path, arch: Architecture, variants: dict[str, Variant], default: str,
                     eos: list[int], bos: int | None, tok: TokenizerFacts, generation: dict) -> Manifest:
    first = variants[default]
    gpu = next((n for n, v in variants.items() if v.dtype == "float16"), default)
    return Manifest(format_version=FORMAT_VERSION, exporter_version="unknown",
                    source={"kind": layout, "name": root.name, "path": str(root)}, architecture=arch,
                    io=first.io, kv_cache=first.kv_cache, variants=variants,
                    default_variant={"cpu": default, "cuda": gpu, "dml": gpu}, eos_token_ids=eos, bos_token_id=bos,
                    add_bos_token=tok.add_bos_token, tokenizer=tok.tokenizer, chat_template=tok.chat_template,
                    generation=generation, format=layout)
