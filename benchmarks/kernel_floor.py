"""What ONNX Runtime's CPU kernels alone cost for one SmolLM2-135M token: the floor under any ORT runtime.

    .venv/bin/python benchmarks/kernel_floor.py [--threads 2] [--repeats 3] [--sweep]

Builds small synthetic graphs with SmolLM2-135M's shapes (30 layers; qkv 576->960, o 576->576,
gate|up 576->3072, down 1536->576; lm_head 576->49152) and random weights, and times them in one process,
side by side:
  - the 120 body MatMulNBits of one decode step (M=1): int4 and int8, blocks of 32, accuracy level 4,
    and the same with accuracy level 1 (fp32 compute);
  - the lm_head as MatMulNBits, 4 and 8 bits;
  - 30 GroupQueryAttention nodes (9 heads, 3 KV heads, head 64, rotary) after 64 and 512 cached tokens;
  - the body's matrix products for a 64-token prefill (M=64): MatMulNBits int4/int8, fp32 MatMul, and
    DynamicQuantizeMatMul (per-tensor dynamic int8 activations, the kernel optimum's int8 uses).
Medians of many calls, best of --repeats; the machine moves ~20% between runs, so read ratios.

Caution: the body's 106 MiB (int8) or 65 MiB (int4) of weights are read again on every call, so a
harness that runs only them keeps much of them in the last-level cache, which a whole model (more
weights, the lm_head, the KV cache) does not. --sweep shows it: 8-bit M=1 products over weight sets
of 28 to 142 MiB, with the rate each one streams its weights at.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

LAYERS, HIDDEN, QKV, FFN, VOCAB = 30, 576, 960, 1536, 49152
SHAPES = [("qkv", HIDDEN, QKV), ("o", HIDDEN, HIDDEN), ("gate_up", HIDDEN, 2 * FFN), ("down", FFN, HIDDEN)]
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=OPSETS)


def matmuls(kind: str, m: int, *, bits: int = 4, accuracy: int = 4, layers: int = LAYERS, lm_head: bool = False):
    """Each layer's four products, every one fed by the graph input (so all of them run, independent of each other)."""
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    shapes = [("lm", HIDDEN, VOCAB)] if lm_head else [(f"l{i}_{n}", k, o) for i in range(layers) for n, k, o in SHAPES]
    for name, k, n in shapes:
        x = "x" if k == HIDDEN else "x_ffn"
        if kind == "nbits":
            blob = rng.integers(0, 255, (n, k // 32, 32 * bits // 8), dtype=np.uint8)
            scales = rng.random(n * k // 32, dtype=np.float32) * 0.01
            inits += [numpy_helper.from_array(blob, f"{name}.q"), numpy_helper.from_array(scales, f"{name}.s")]
            nodes.append(helper.make_node("MatMulNBits", [x, f"{name}.q", f"{name}.s"], [name], domain="com.microsoft",
                                          K=k, N=n, bits=bits, block_size=32, accuracy_level=accuracy))
        elif kind == "fp32":
            inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, f"{name}.w"))
            nodes.append(helper.make_node("MatMul", [x, f"{name}.w"], [name]))
        else:  # "dynamic": int8 per-channel weights, activations quantized per tensor at run time
            inits += [numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), f"{name}.w"),
                      numpy_helper.from_array(rng.random(n, dtype=np.float32) * 1e-3, f"{name}.s")]
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, f"{name}.w", f"{name}.s"], [name],
                                          domain="com.microsoft"))
        outs.append(name)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, HIDDEN]),
              helper.make_tensor_value_info("x_ffn", TensorProto.FLOAT, [1, m, FFN])]
    return _model(nodes, inputs, outs, inits), {"x": np.random.rand(1, m, HIDDEN).astype(np.float32),
                                                "x_ffn": np.random.rand(1, m, FFN).astype(np.float32)}


def attention(past: int, capacity: int = 1024):
    cos = numpy_helper.from_array(np.random.rand(8192, 32).astype(np.float32), "cos")
    sin = numpy_helper.from_array(np.random.rand(8192, 32).astype(np.float32), "sin")
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 1, QKV]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    nodes, outs, feed = [], [], {"qkv": np.random.rand(1, 1, QKV).astype(np.float32),
                                 "seqlens_k": np.array([past], np.int32), "total": np.array(past + 1, np.int32)}
    for i in range(LAYERS):
        inputs += [helper.make_tensor_value_info(f"k{i}", TensorProto.FLOAT, [1, 3, "c", 64]),
                   helper.make_tensor_value_info(f"v{i}", TensorProto.FLOAT, [1, 3, "c", 64])]
        nodes.append(helper.make_node("GroupQueryAttention",
                                      ["qkv", "", "", f"k{i}", f"v{i}", "seqlens_k", "total", "cos", "sin"],
                                      [f"a{i}", f"k{i}.out", f"v{i}.out"], domain="com.microsoft", num_heads=9,
                                      kv_num_heads=3, do_rotary=1))
        outs += [f"a{i}", f"k{i}.out", f"v{i}.out"]
        for kv in (f"k{i}", f"v{i}"):
            feed[kv] = np.random.rand(1, 3, capacity, 64).astype(np.float32)
    return _model(nodes, inputs, outs, [cos, sin]), feed


def time_model(model, feed, threads: int, calls: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    buffers = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feed.items()}
    for name, value in buffers.items():
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        if out.name.endswith(".out"):  # a KV cache: past and present share one buffer, as in onnxllm's runtime
            binding.bind_ortvalue_output(out.name, buffers[out.name[: -len(".out")]])
        else:
            binding.bind_output(out.name, "cpu")
    for _ in range(max(3, calls // 10)):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def sweep(threads: int, repeats: int) -> None:
    """M=1 int8 MatMulNBits over 10-50 layers' qkv, o and gate|up: time and GiB/s against the bytes read."""
    print("working-set sweep: 8-bit MatMulNBits at M=1, qkv + o + gate|up per layer")
    for layers in (10, 20, 26, 30, 34, 38, 42, 50):
        model, feed = matmuls("nbits", 1, bits=8, layers=layers)
        # keep the three K=576 products: down_proj's input differs, and the sweep wants one byte count
        keep = [n for n in model.graph.node if not n.output[0].endswith("_down")]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        del model.graph.output[:]
        model.graph.output.extend(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in keep)
        used = {i for n in keep for i in n.input}
        inits = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
        mib = sum(t.raw_data.__len__() for t in inits) / 2**20
        best = min(time_model(model, feed, threads, 100) for _ in range(repeats))
        print(f"  {layers:2d} layers {mib:6.1f} MiB  {best:6.2f} ms  {mib / 1024 / best * 1e3:5.1f} GiB/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="only the working-set sweep")
    args = parser.parse_args()
    if args.sweep:
        sweep(args.threads, args.repeats)
        return
    cases = [
        ("decode: 120 body MatMulNBits int4, acc 4", lambda: matmuls("nbits", 1, bits=4), 200),
        ("decode: 120 body MatMulNBits int8, acc 4", lambda: matmuls("nbits", 1, bits=8), 200),
        ("decode: 120 body MatMulNBits int4, acc 1", lambda: matmuls("nbits", 1, bits=4, accuracy=1), 100),
        ("decode: 120 body DynamicQuantizeMatMul int8", lambda: matmuls("dynamic", 1), 200),
        ("decode: 120 body fp32 MatMul", lambda: matmuls("fp32", 1), 50),
        ("decode: lm_head MatMulNBits 4-bit", lambda: matmuls("nbits", 1, bits=4, lm_head=True), 200),
        ("decode: lm_head MatMulNBits 8-bit", lambda: matmuls("nbits", 1, bits=8, lm_head=True), 200),
        ("decode: 30 GroupQueryAttention, 64 cached", lambda: attention(64), 200),
        ("decode: 30 GroupQueryAttention, 512 cached", lambda: attention(512), 200),
        ("prefill 64: body MatMulNBits int4, acc 4", lambda: matmuls("nbits", 64, bits=4), 20),
        ("prefill 64: body MatMulNBits int8, acc 4", lambda: matmuls("nbits", 64, bits=8), 20),
        ("prefill 64: body fp32 MatMul", lambda: matmuls("fp32", 64), 20),
        ("prefill 64: body DynamicQuantizeMatMul int8", lambda: matmuls("dynamic", 64), 20),
    ]
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, onnxruntime {ort.__version__}; "
          f"best of {args.repeats} medians")
    for label, build, calls in cases:
        model, feed = build()
        best = min(time_model(model, feed, args.threads, calls) for _ in range(args.repeats))
        extra = f"  ({64e3 / best:.0f} tok/s of matrix products)" if label.startswith("prefill") else ""
        print(f"{label:48s} {best:7.2f} ms{extra}", flush=True)


if __name__ == "__main__":
    main()
