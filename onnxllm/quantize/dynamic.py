"""int8-dynamic: SmoothQuant-style smoothing folded into the graph, then DynamicQuantizeMatMul.

DynamicQuantizeMatMul (int8 weights per output channel, activations quantized to int8 at run time, one
scale per call) is ONNX Runtime's fastest CPU product for a prompt (VNNI/AMX int8 GEMM: ~3x MatMulNBits
at 64 tokens, benchmarks/kernel_floor.py). Alone it ruins quality: one activation scale per prompt is set by
a few outlier channels. Smoothing moves that range into the weights: for each product x @ W, with
s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) measured on calibration text,

    x @ W = (x / s) @ (s * W)

and 1/s is folded exactly into what produces x: the input norm's weight (and bias) for qkv, the
post-attention norm's for the gate|up product, and the V columns (and bias) of qkv for o_proj (one scale
per KV head channel, shared by the query heads that read it). down_proj keeps MatMulNBits: its input
(silu(gate) * up) carries the massive activations no smoothing tames (measured on SmolLM2: top-1 86-92%
when it is smoothed too). Names follow onnxllm's graph builder (exporter/graph.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..decoder_io import DecoderIO
from ..errors import QuantizeError

ALPHA = 0.7  # SmolLM2, 256 tokens of Hamlet, whole sequence: alpha 0.5 top-1 97.3%; 0.7 98.4%; 0.85 86.3%
_NORMS = {  # op -> (index of the weight input, index of the bias input or None)
    "SimplifiedLayerNormalization": (1, None), "SkipSimplifiedLayerNormalization": (2, None),
    "LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3),
}

# Calibration text: varied prose, dialogue, code and numbers, none of it Hamlet (the quality text).
CALIBRATION_TEXT = """\
The river rose for three days before anyone in the valley thought to move the grain. By the fourth
morning the low fields were a brown lake, and the ferryman charged twice his usual fare to cross it.
"Will it hold?" asked the mayor, pointing at the old stone bridge. "It held in 1893," said the engineer,
"and it was a smaller river then." Nobody laughed.
def moving_average(values, window=3):
    # Return the mean of each run of `window` consecutive values.
    return [sum(values[i:i + window]) / window for i in range(len(values) - window + 1)]
Quarterly revenue was $4.2 million, up 17% from $3.6 million a year earlier; operating costs fell 3.5%.
Photosynthesis converts light energy into chemical energy: carbon dioxide and water become glucose and
oxygen inside the chloroplasts of plant cells. Mitochondria then release that energy during respiration.
User: Can you suggest a name for a small bakery by the sea? Assistant: How about "Salt & Crumb"?
SELECT name, COUNT(*) AS orders FROM customers JOIN orders USING (customer_id) GROUP BY name;
In 1969 the first humans walked on the Moon; 2.5 billion people are thought to have watched on television.
"""


def _inits(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def _get(inits, name) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name]).astype(np.float32)


def _put(inits, name, array) -> None:
    from onnx import numpy_helper

    inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


def probe_session(model, names: list[str]):
    """A CPU session over `model` that also outputs the named (float) intermediate tensors; `model` is
    left as it was.

    The graph goes to ONNX Runtime as a file whose weights lie in a data file beside it, written from the
    initializers' bytes: a protobuf cannot hold 2 GiB (a 1B model in float32 failed to serialize), and no
    second copy of the weights is made in memory (ORT maps the file)."""
    import onnx
    import onnxruntime as ort

    probe = _without_initializers(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="onnxllm-probe-") as scratch:
        path = Path(scratch) / "probe.onnx"
        with open(path.with_name("probe.onnx.data"), "wb") as data:
            for tensor in model.graph.initializer:
                probe.graph.initializer.append(_external_copy(tensor, data, "probe.onnx.data"))
        path.write_bytes(probe.SerializeToString())
        # the session reads the data while it is built; nothing refers to the folder afterwards
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _without_initializers(model):
    """A copy of `model` with every part but the graph's initializers (`model` itself is not touched: its
    tensors are referenced elsewhere while they are rewritten)."""
    import onnx

    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    _copy_fields(model.graph, shell.graph, skip="initializer")
    return shell


def _copy_fields(src, dst, *, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _external_copy(tensor, data, location: str):
    """`tensor`'s header pointing at its bytes, appended to the open file `data` (small ones stay inline)."""
    import onnx

    if not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024:
        return tensor
    header = onnx.TensorProto()
    header.name, header.data_type = tensor.name, tensor.data_type
    header.dims.extend(tensor.dims)
    offset = data.tell()
    data.write(tensor.raw_data)
    header.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(tensor.raw_data)))):
        entry = header.external_data.add()
        entry.key, entry.value = key, value
    return header


def activation_ranges(model, manifest, ids: list[int], names: list[str]) -> dict[str, np.ndarray]:
    """max |x| per channel of each named tensor, over a forward pass of `ids` (empty past) in ORT."""
    session = probe_session(model, names)
    outs = session.run(names, DecoderIO.from_manifest(manifest).feed(ids))
    return {n: np.abs(o.reshape(-1, o.shape[-1])).max(axis=0) for n, o in zip(names, outs)}


def smooth_and_convert(model, manifest, ids: list[int], *, alpha: float = ALPHA, exclude=lambda name: False,
                       convert: bool = True) -> dict:
    """Fold smoothing into `model` (float32, in place) and make qkv, o_proj and gate|up DynamicQuantizeMatMul.

    `convert=False` stops after the folding (the same function, float weights): what tests check.
    Returns what was done (for the manifest). Raises QuantizeError when no layer has the expected form.
    """
    from onnx import helper, numpy_helper

    inits = _inits(model)
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list] = {}  # tensor name -> the nodes that read it
    for n in model.graph.node:
        for x in n.input:
            users.setdefault(x, []).append(n)
    kv, head_dim = manifest.architecture.num_kv_heads, manifest.architecture.head_dim

    plans = []  # (MatMul node, how its input's scale is folded)
    for layer in range(manifest.architecture.num_layers):
        # o_proj first: its scale is folded into qkv's V columns while qkv is still float.
        for part in ("attn/o_proj", "attn/qkv_proj", "mlp/up_proj"):
            node = nodes.get(f"/model/layers.{layer}/{part}/MatMul")
            if node is None or node.input[1] not in inits or exclude(node.name):
                continue
            plans.append((layer, part, node))
    if not plans:
        raise QuantizeError("int8-dynamic needs a graph made by onnxllm's exporter (fused qkv_proj / up_proj "
                            "MatMuls); this package has none: use --scheme int8")
    ranges = activation_ranges(model, manifest, ids, sorted({n.input[0] for _, _, n in plans}))

    converted = []
    for layer, part, node in plans:
        w = _get(inits, node.input[1])  # (K, N)
        s = (np.clip(ranges[node.input[0]], 1e-5, None) ** alpha
             / np.clip(np.abs(w).max(axis=1), 1e-5, None) ** (1 - alpha))
        src = producer.get(node.input[0])
        if part == "attn/o_proj":
            qkv = nodes.get(f"/model/layers.{layer}/attn/qkv_proj/MatMul")
            if src is None or src.op_type != "GroupQueryAttention" or qkv is None or qkv.input[1] not in inits:
                continue
            wq = _get(inits, qkv.input[1])
            heads = wq.shape[1] // head_dim - 2 * kv
            if heads * head_dim != w.shape[0] or heads % kv:
                continue
            s_kv = s.reshape(kv, heads // kv, head_dim).max(axis=1)  # one scale per V channel
            s = np.repeat(s_kv, heads // kv, axis=0).reshape(-1)  # query head h reads KV head h // (heads/kv)
            v = slice((heads + kv) * head_dim, None)
            wq[:, v] /= s_kv.reshape(-1)[None]
            _put(inits, qkv.input[1], wq)
            adds = [n for n in users.get(qkv.output[0], []) if n.op_type == "Add"]
            bias = next((x for n in adds for x in n.input if x in inits), None)
            if bias is not None:  # qkv bias (Qwen2, GPT-2): its V part scales with the V columns
                b = _get(inits, bias)
                b[v] /= s_kv.reshape(-1)
                _put(inits, bias, b)
        else:
            if src is None or src.op_type not in _NORMS or len(users.get(node.input[0], [])) != 1:
                continue
            w_index, b_index = _NORMS[src.op_type]
            gamma = src.input[w_index]
            if gamma not in inits or len(users.get(gamma, [])) != 1:
                continue
            _put(inits, gamma, _get(inits, gamma) / s)
            if b_index is not None and len(src.input) > b_index and src.input[b_index] in inits:
                _put(inits, src.input[b_index], _get(inits, src.input[b_index]) / s)
        w = w * s[:, None]
        if not convert:
            _put(inits, node.input[1], w)
            converted.append(node.name)
            continue
        scale = np.abs(w).max(axis=0) / 127.0
        scale[scale == 0] = 1.0
        _put(inits, node.input[1], np.clip(np.round(w / scale), -127, 127).astype(np.int8))
        model.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), node.input[1] + "_scale"))
        replacement = helper.make_node("DynamicQuantizeMatMul",
                                       [node.input[0], node.input[1], node.input[1] + "_scale"],
                                       list(node.output), name=node.name + "_DQ", domain="com.microsoft")
        node.CopyFrom(replacement)
        converted.append(replacement.name)
    if not converted:
        raise QuantizeError("int8-dynamic found no product it can smooth exactly in this graph; use --scheme int8")
    return {"operator": "com.microsoft.DynamicQuantizeMatMul", "smoothing_alpha": alpha,
            "calibration_tokens": len(ids), "converted": len(converted),
            "rest": "down_proj, lm_head and embedding as in int8 (MatMulNBits / GatherBlockQuantized, 8-bit)"}
