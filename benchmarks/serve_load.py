"""Load on `onnxllm serve`: N streaming clients against one local server, and the same requests through the API.

    .venv/bin/python benchmarks/serve_load.py [MODEL] [--clients 1,4,16] [--requests 16] [--max-tokens 64]
                                              [--threads 2] [--json FILE]

The server runs in its own process (`onnxllm serve MODEL --port 0`), the clients in this one (threads with
httpx, reading the server-sent events as they come). Each client level sends --requests chat requests in
all (greedy, streamed, with usage), spread over N clients that each send their next request when the last
one ends. Per level: requests/s, time to first token and per-token latency percentiles (a request's
per-token latency is (last token - first token) / (tokens - 1)), errors, tokens/s over all clients.

Overhead: before the server starts, this process loads the same model with the same threads and runs
every prompt through Model.generate; the server's per-token latency with one client over that is the
cost of HTTP, JSON and the event loop per token (target <= 5%). RSS: the server process's resident set
after its first answer and after all levels. Greedy answers through the server are compared with the
API's (int8 variants may part at a near tie when the KV cache reuse differs; reported, not asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

import onnxllm  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Give me three tips for a good night's sleep.",
    "Explain what a hash table is.", "Write a haiku about the sea.", "Why is the sky blue?",
    "What are the planets of the solar system?", "How do I boil an egg?", "Name three famous painters.",
    "What does a compiler do?", "Describe a cat to someone who has never seen one.",
    "What is photosynthesis?", "Suggest a name for a bakery.", "How many legs does a spider have?",
    "What is the difference between weather and climate?", "Tell me a fun fact about octopuses.",
    "What is 12 times 12?",
]


@dataclass
class Request:
    prompt: str
    started: float = 0.0
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.started

    @property
    def per_token_s(self) -> float | None:
        if self.first is None or self.last is None or self.tokens < 2:
            return None
        return (self.last - self.first) / (self.tokens - 1)


@dataclass
class Level:
    clients: int
    requests: int
    errors: int
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    ttft_ms: dict = field(default_factory=dict)
    per_token_ms: dict = field(default_factory=dict)
    same_as_api: str = ""
    raw: list = field(default_factory=list, repr=False)  # the Requests, to merge rounds

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "raw"}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)

    def at(q: float) -> float:
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    return {"p50": round(1000 * at(0.5), 2), "p90": round(1000 * at(0.9), 2), "p99": round(1000 * at(0.99), 2)}


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def ask(client: httpx.Client, url: str, model: str, request: Request, max_tokens: int) -> None:
    body = {"model": model, "messages": messages(request.prompt), "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    parts = []
    request.started = time.perf_counter()
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
            if response.status_code != 200:
                response.read()
                request.error = f"{response.status_code} {response.text[:200]}"
                return
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    request.error = event["error"]["message"]
                    return
                if event.get("usage"):
                    request.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice["delta"].get("content"):
                        now = time.perf_counter()
                        request.first = request.first or now
                        request.last = now
                        parts.append(choice["delta"]["content"])
    except httpx.HTTPError as exc:
        request.error = f"{type(exc).__name__}: {exc}"
    request.text = "".join(parts)


def run_level(url: str, model: str, clients: int, total: int, max_tokens: int, expected: dict[str, str]) -> Level:
    per_client = [[PROMPTS[(c + clients * i) % len(PROMPTS)] for i in range(total // clients + (c < total % clients))]
                  for c in range(clients)]
    done: list[Request] = []
    lock = threading.Lock()

    def worker(prompts: list[str]) -> None:
        with httpx.Client() as client:
            for prompt in prompts:
                request = Request(prompt)
                ask(client, url, model, request, max_tokens)
                with lock:
                    done.append(request)

    threads = [threading.Thread(target=worker, args=(p,)) for p in per_client]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in done if r.error is None]
    same = sum(r.text == expected[r.prompt] for r in ok)
    return Level(clients=clients, requests=len(done), errors=len(done) - len(ok), wall_s=round(wall, 2),
                 requests_per_s=round(len(ok) / wall, 2), tokens_per_s=round(sum(r.tokens for r in ok) / wall, 1),
                 ttft_ms=percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
                 per_token_ms=percentiles([r.per_token_s for r in ok if r.per_token_s is not None]),
                 same_as_api=f"{same}/{len(ok)}", raw=done)


def merge(rounds: list[Level]) -> Level:
    """Several one-client passes as one level: percentiles over all their requests."""
    done = [r for lv in rounds for r in lv.raw]
    ok = [r for r in done if r.error is None]
    wall = sum(lv.wall_s for lv in rounds)
    same = sum(int(lv.same_as_api.split("/")[0]) for lv in rounds)
    return Level(clients=rounds[0].clients, requests=len(done), errors=len(done) - len(ok), wall_s=round(wall, 2),
                 requests_per_s=round(len(ok) / wall, 2), tokens_per_s=round(sum(r.tokens for r in ok) / wall, 1),
                 ttft_ms=percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
                 per_token_ms=percentiles([r.per_token_s for r in ok if r.per_token_s is not None]),
                 same_as_api=f"{same}/{len(ok)}")


class Direct:
    """The same requests through Model.generate in this process (the model stays loaded, idle while the server runs)."""

    def __init__(self, model_name: str, threads: int, max_tokens: int):
        self.model = onnxllm.load(model_name, threads=threads)
        self.max_tokens = max_tokens
        self.model.generate(messages(PROMPTS[0]), max_tokens=8)  # warm-up
        self.texts: dict[str, str] = {}
        self.ttft: list[float] = []
        self.per_token: list[float] = []

    def run(self, prompts: list[str]) -> None:
        for prompt in prompts:
            result = self.model.generate(messages(prompt), max_tokens=self.max_tokens)
            self.texts[prompt] = result.text
            t = result.timings
            self.ttft.append(t.prefill_s)
            if t.generated_tokens > 1:
                self.per_token.append(t.decode_s / (t.generated_tokens - 1))

    def info(self) -> dict:
        return {"variant": self.model.variant, "ttft_ms": percentiles(self.ttft),
                "per_token_ms": percentiles(self.per_token)}


def start_server(model: str, threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "onnxllm.cli", "serve", model, "--port", "0", "--threads",
                             str(threads), "--max-queue", "256", "--keep-alive", "-1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stderr:
        match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line, flags=re.I)
        if match:
            # keep draining the server's log so its pipe never fills
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, match.group(1)
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def machine() -> dict:
    import fastapi
    import onnxruntime
    import uvicorn

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        rev = "?"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__, "onnxllm": f"{onnxllm.__version__} ({rev})",
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def table(levels: list[Level], api: dict, rss: tuple[float, float], overhead: float | None, *,
          api_requests: int) -> str:
    rows = ["| clients | requests | errors | requests/s | tokens/s | TTFT p50 / p90 / p99 ms | "
            "per-token p50 / p90 / p99 ms | answers = API |", "|---:|---:|---:|---:|---:|---|---|---:|"]
    for lv in levels:
        ttft = " / ".join(str(lv.ttft_ms.get(k, "-")) for k in ("p50", "p90", "p99"))
        tok = " / ".join(str(lv.per_token_ms.get(k, "-")) for k in ("p50", "p90", "p99"))
        rows.append(f"| {lv.clients} | {lv.requests} | {lv.errors} | {lv.requests_per_s} | {lv.tokens_per_s} | "
                    f"{ttft} | {tok} | {lv.same_as_api} |")
    api_tok = " / ".join(str(api["per_token_ms"].get(k, "-")) for k in ("p50", "p90", "p99"))
    api_ttft = " / ".join(str(api["ttft_ms"].get(k, "-")) for k in ("p50", "p90", "p99"))
    rows.append(f"| API, no server | {api_requests} | 0 | | | {api_ttft} (prefill) | {api_tok} | |")
    lines = ["\n".join(rows), ""]
    if overhead is not None:
        lines.append(f"Server overhead per token, 1 client vs the API (medians): {overhead:+.1f}% (target <= 5%)")
    lines.append(f"Server RSS: {rss[0]:.0f} MiB after its first answer, {rss[1]:.0f} MiB after all levels")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per client level, in all")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads, API and server alike")
    parser.add_argument("--rounds", type=int, default=3,
                        help="API / one-client server passes over the prompts, alternated, for the overhead")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args()
    levels_wanted = [int(x) for x in args.clients.split(",")]

    info = machine()
    print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    api = Direct(args.model, args.threads, args.max_tokens)
    proc, url = start_server(args.model, args.threads)
    try:
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        with httpx.Client() as client:
            ask(client, url, name, Request(PROMPTS[0]), 8)  # loads the model, warms it up
        server = psutil.Process(proc.pid)
        rss_before = server.memory_info().rss / 2**20
        # Overhead: alternate API and one-client server passes, so a change in the machine's load hits both.
        one_client: list[Level] = []
        for _ in range(args.rounds):
            api.run(PROMPTS)
            level = run_level(url, name, 1, len(PROMPTS), args.max_tokens, api.texts)
            one_client.append(level)
        print(f"API: {api.info()}", flush=True)
        levels = [merge(one_client)]
        print(f"1 client: {levels[-1].as_dict()}", flush=True)
        for n in (n for n in levels_wanted if n != 1):
            levels.append(run_level(url, name, n, max(args.requests, n), args.max_tokens, api.texts))
            print(f"{n} clients: {levels[-1].as_dict()}", flush=True)
        rss_after = server.memory_info().rss / 2**20
    finally:
        proc.terminate()
        proc.wait(30)
    overhead = None
    if levels[0].per_token_ms and api.per_token:
        overhead = 100 * (levels[0].per_token_ms["p50"] / api.info()["per_token_ms"]["p50"] - 1)
    print()
    print(table(levels, api.info(), (rss_before, rss_after), overhead, api_requests=len(api.per_token)))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(
            {"machine": info, "api": api.info(), "levels": [lv.as_dict() for lv in levels], "overhead_pct": overhead,
             "rss_mib": [round(rss_before, 1), round(rss_after, 1)]}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
