"""Model folders made the way other tools make them, from a tiny HF checkpoint (tests/_tiny.py).

    folder = make_hf_onnx_folder(tmp_path, ckpt)                       # transformers.js: onnx/model*.onnx
    folder = make_hf_onnx_folder(tmp_path, ckpt, layout="optimum")     # model.onnx beside config.json
    make_hf_onnx_folder(tmp_path, ckpt, position_ids=False)            # the graph computes positions itself
    make_hf_onnx_folder(tmp_path, ckpt, merged=True)                   # optimum's merged decoder: use_cache_branch

The graph is what optimum's exporter produces: torch.onnx.export of the transformers model with its cache
flattened to past_key_values.{i}.key/value inputs and present.{i}.key/value outputs (past and new KV
concatenated), batch/sequence axes dynamic. Variants beside it as transformers.js makes them: model_fp16
(float16 weights and I/O, onnxruntime's float16 converter) and model_q4 (MatMulNBits, 4 bits, block 32).
"""

from __future__ import annotations

import shutil
from pathlib import Path


def _export(ckpt: Path, out: Path, *, position_ids: bool, with_past: bool = True) -> None:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *rest):
            if position_ids:
                positions, past = rest[0], rest[1:]
            else:  # as optimum's exports for models that take none: positions from the mask
                positions = (attention_mask.cumsum(-1) - 1)[:, -input_ids.shape[1]:]
                past = rest
            cache = DynamicCache()
            for i in range(layers if with_past else 0):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    past_len = 2 if with_past else 0
    past = [torch.zeros(1, kv_heads, past_len, head_dim) for _ in range(2 * layers)] if with_past else []
    args = (torch.tensor([[1, 2, 3]]), torch.ones(1, 3 + past_len, dtype=torch.long))
    args += ((torch.tensor([[past_len, past_len + 1, past_len + 2]]),) if position_ids else ()) + tuple(past)
    names_in = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else [])
    names_in += [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")] if with_past else []
    names_out = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    axes = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in names_in if n.startswith("past")})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in names_out[1:]})
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(Flat(), args, str(out), input_names=names_in, output_names=names_out,
                      dynamic_axes={k: v for k, v in axes.items() if k in names_in + names_out}, opset_version=17,
                      dynamo=False)


def _merge(no_past: Path, with_past: Path, out: Path) -> None:
    """optimum's merged decoder: If(use_cache_branch) -> the with-past graph, else the one without past."""
    import onnx
    from onnx import TensorProto, helper

    def branch(path: Path, prefix: str, outer: set[str]):
        g = onnx.load(str(path)).graph
        keep = outer | {""}

        def rename(x):
            return x if x in keep else prefix + x

        for node in g.node:
            node.name = prefix + node.name
            node.input[:] = [rename(x) for x in node.input]
            node.output[:] = [rename(x) for x in node.output]
        for t in g.initializer:
            t.name = rename(t.name)
        outputs = [helper.make_tensor_value_info(prefix + o.name, o.type.tensor_type.elem_type, None) for o in g.output]
        for o in g.output:
            o.name = prefix + o.name
        sub = helper.make_graph(list(g.node), prefix + "branch", [], outputs, list(g.initializer))
        return sub, g

    full = onnx.load(str(with_past))
    outer_inputs = {i.name for i in full.graph.input}
    then_g, _ = branch(with_past, "with_past/", outer_inputs)
    else_g, _ = branch(no_past, "no_past/", outer_inputs)
    cond = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    node = helper.make_node("If", ["use_cache_branch"], [o.name for o in full.graph.output], name="optimum::if",
                            then_branch=then_g, else_branch=else_g)
    graph = helper.make_graph([node], "merged_decoder", list(full.graph.input) + [cond], list(full.graph.output))
    merged = helper.make_model(graph, opset_imports=list(full.opset_import))
    merged.ir_version = full.ir_version
    onnx.save(merged, str(out))


def _variants(base: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(base))
    onnx.save(convert_float_to_float16(model, keep_io_types=False), str(base.with_name("model_fp16.onnx")))
    quant = MatMulNBitsQuantizer(onnx.load(str(base)), block_size=32, is_symmetric=True)
    quant.process()
    onnx.save(quant.model.model, str(base.with_name("model_q4.onnx")))


def make_hf_onnx_folder(tmp_path: Path, ckpt: Path, *, layout: str = "transformers.js", position_ids: bool = True,
                        merged: bool = False, variants: bool = True, name: str | None = None) -> Path:
    folder = Path(tmp_path) / (name or f"{layout}-{ckpt.name}")
    folder.mkdir(parents=True)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"):
        if (ckpt / f).is_file():
            shutil.copy(ckpt / f, folder / f)
    onnx_dir = folder / "onnx" if layout == "transformers.js" else folder
    if merged:
        _export(ckpt, folder / "decoder_model.onnx", position_ids=position_ids, with_past=False)
        _export(ckpt, folder / "decoder_with_past_model.onnx", position_ids=position_ids)
        _merge(folder / "decoder_model.onnx", folder / "decoder_with_past_model.onnx",
               folder / "decoder_model_merged.onnx")
        return folder
    _export(ckpt, onnx_dir / "model.onnx", position_ids=position_ids)
    if variants:
        _variants(onnx_dir / "model.onnx")
    return folder
