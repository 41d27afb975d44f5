"""Hugging Face-shaped folders: optimum exports (model.onnx beside config.json) and the transformers.js
layout (onnx/model.onnx and its variants: model_fp16, model_q4, model_q4f16, model_int8, model_quantized...).

config.json gives the architecture, generation_config.json the EOS and defaults; each .onnx is read from its
own graph (how it is quantized, its KV dtype, which optional inputs it takes). A variant's name is its file's
stem without "model_" (what people call it: `--variant q4`); how it is quantized never comes from the name.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidPackageError, OnnxLLMError
from ..package import Architecture, Variant
from .common import foreign_manifest, generation_defaults, read_json, token_ids, tokenizer_facts, variant_of
from .graph import inspect_graph


def onnx_files(root: Path) -> tuple[str, list[Path]]:
    """(layout, graph files): onnx/*.onnx is transformers.js's layout, *.onnx beside config.json optimum's."""
    nested = sorted((root / "onnx").glob("*.onnx")) if (root / "onnx").is_dir() else []
    if nested:
        return "transformers.js", nested
    return "optimum", sorted(root.glob("*.onnx"))


def _name(path: Path, scheme: str) -> str:
    stem = path.stem
    if stem in ("model", "decoder_model_merged", "decoder_with_past_model"):
        return scheme if stem == "model" else stem
    return stem[len("model_"):] if stem.startswith("model_") else stem


def _default(variants: dict[str, Variant]) -> str:
    """The unquantized float32 file when there is one (what the folder's own tools load first), else the first."""
    for want in (("fp32", "float32"), (None, "float32")):
        for name, v in variants.items():
            if (want[0] is None or v.scheme == want[0]) and v.dtype == want[1]:
                return name
    return next(iter(variants))


def read_hf(root: Path, only: Path | None = None):
    """(manifest, {file: why it was skipped}). `only`: read just this file (the user pointed at it)."""
    config = read_json(root, "config.json", required=True)
    layout, files = onnx_files(root)
    if only is not None:
        files = [only]
    if not files:
        raise InvalidPackageError(f"{root} has config.json but no .onnx file (looked in {root} and {root}/onnx)")
    variants, skipped, first_error, params = {}, {}, None, 0
    for path in files:
        try:
            facts = inspect_graph(path, root)
        except OnnxLLMError as exc:
            if only is not None:
                raise
            skipped[str(path.relative_to(root))] = str(exc)
            first_error = first_error or exc
            continue
        name = _name(path, facts.scheme)
        while name in variants:
            name += "_"
        variants[name] = variant_of(facts, root, layout)
        last, params = facts, max(params, facts.parameters)
    if not variants:
        raise first_error
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size") or config.get("n_embd")
    kv_heads = config.get("num_key_value_heads") or last.num_kv_heads or heads
    head_dim = config.get("head_dim") or last.head_dim or (hidden // heads if hidden and heads else None)
    vocab = config.get("vocab_size") or last.vocab_size
    context = config.get("max_position_embeddings") or config.get("n_positions")
    for key, value in (("num_key_value_heads", kv_heads), ("head_dim", head_dim), ("vocab_size", vocab),
                       ("max_position_embeddings", context)):
        if not isinstance(value, int) or value < 1:
            raise InvalidPackageError(f"{root}/config.json: cannot tell {key} (got {value!r}); add it to config.json")
    arch = Architecture(model_type=str(config.get("model_type", "unknown")), vocab_size=vocab,
                        hidden_size=int(hidden or 0), num_layers=last.num_layers, num_heads=int(heads or kv_heads),
                        num_kv_heads=kv_heads, head_dim=head_dim,
                        intermediate_size=int(config.get("intermediate_size") or 0), context_length=context,
                        parameters=params)
    gen = read_json(root, "generation_config.json")
    eos = token_ids(gen.get("eos_token_id", config.get("eos_token_id")))
    bos = next(iter(token_ids(gen.get("bos_token_id", config.get("bos_token_id")))), None)
    generation = generation_defaults(bool(gen.get("do_sample")), gen.get("temperature"), gen.get("top_k"),
                                     gen.get("top_p"), gen.get("repetition_penalty"), gen.get("max_new_tokens"))
    manifest = foreign_manifest(layout=layout, root=root, arch=arch, variants=variants, default=_default(variants),
                                eos=eos, bos=bos, tok=tokenizer_facts(root, bos), generation=generation)
    return manifest, skipped
