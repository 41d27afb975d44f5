"""Folders made by onnxruntime-genai's model builder: genai_config.json beside model.onnx (+ .data).

genai_config.json names the I/O, heads, head size, layers, context, EOS/BOS and search defaults; the graph
says the KV dtype, how it is quantized and whether attention shares the past/present buffer.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidPackageError
from ..package import Architecture, safe_path
from .common import foreign_manifest, generation_defaults, read_json, token_ids, tokenizer_facts, variant_of
from .graph import inspect_graph

LAYOUT = "genai"


def _names(section: dict, key: str, default: str) -> str:
    value = section.get(key, default)
    if not isinstance(value, str) or value.count("%d") != 1:
        raise InvalidPackageError(f"genai_config.json: {key} must be a name with one %d, got {value!r}")
    return value.replace("%d", "{}")


def read_genai(root: Path):
    config = read_json(root, "genai_config.json", required=True)
    try:
        model, decoder = config["model"], config["model"]["decoder"]
        filename = decoder["filename"]
    except (KeyError, TypeError):
        raise InvalidPackageError(f"{root}/genai_config.json has no model.decoder.filename; it is not a "
                                  "genai_config.json onnxllm can read") from None
    if not isinstance(filename, str):
        raise InvalidPackageError("genai_config.json: model.decoder.filename must be a file name")
    path = safe_path(root, filename)  # refuses names outside the folder
    if not path.is_file():
        raise InvalidPackageError(f"genai_config.json names {filename}, which is not in {root}")
    facts = inspect_graph(path, root)
    inputs, outputs = decoder.get("inputs", {}), decoder.get("outputs", {})
    named = {"past_key": _names(inputs, "past_key_names", "past_key_values.%d.key"),
             "past_value": _names(inputs, "past_value_names", "past_key_values.%d.value"),
             "present_key": _names(outputs, "present_key_names", "present.%d.key"),
             "present_value": _names(outputs, "present_value_names", "present.%d.value")}
    for role, name in named.items():
        if getattr(facts.io, role) != name:
            raise InvalidPackageError(f"genai_config.json names {role} {name.format(0)!r}, which the graph "
                                      f"{filename} does not have")
    search = config.get("search", {}) if isinstance(config.get("search"), dict) else {}
    heads = decoder.get("num_attention_heads")
    kv_heads = decoder.get("num_key_value_heads", facts.num_kv_heads)
    head_size = decoder.get("head_size", facts.head_dim)
    layers = decoder.get("num_hidden_layers", facts.num_layers)
    vocab = model.get("vocab_size", facts.vocab_size)
    context = model.get("context_length")
    for key, value in (("num_key_value_heads", kv_heads), ("head_size", head_size), ("vocab_size", vocab),
                       ("context_length", context), ("num_hidden_layers", layers)):
        if not isinstance(value, int) or value < 1:
            raise InvalidPackageError(f"genai_config.json: {key} must be a positive integer, got {value!r}")
    if layers != facts.num_layers:
        raise InvalidPackageError(f"genai_config.json says {layers} layers, the graph has {facts.num_layers}")
    kv = facts.kv
    if search.get("past_present_share_buffer") is False:
        from dataclasses import replace

        kv = replace(kv, shared_buffer=False)
    hidden = decoder.get("hidden_size", 0)
    arch = Architecture(model_type=str(model.get("type", "unknown")), vocab_size=vocab, hidden_size=int(hidden or 0),
                        num_layers=layers, num_heads=int(heads or kv_heads), num_kv_heads=kv_heads,
                        head_dim=head_size, intermediate_size=0, context_length=context, parameters=facts.parameters)
    from dataclasses import replace

    variant = replace(variant_of(facts, root, LAYOUT), kv_cache=kv)
    bos = model.get("bos_token_id") if isinstance(model.get("bos_token_id"), int) else None
    generation = generation_defaults(bool(search.get("do_sample")), search.get("temperature"), search.get("top_k"),
                                     search.get("top_p"), search.get("repetition_penalty"))
    name = variant.scheme
    return foreign_manifest(layout=LAYOUT, root=root, arch=arch, variants={name: variant}, default=name,
                            eos=token_ids(model.get("eos_token_id")), bos=bos, tok=tokenizer_facts(root, bos),
                            generation=generation)
