"""onnxllm replicas under Ray Serve: Ray runs the processes, routes requests and autoscales; each replica
is onnxllm's own OpenAI-compatible app with its models loaded in that process.

    pip install 'onnxllm[serve]' 'ray[serve]'
    python examples/ray_serve.py smollm2-135m-instruct --min-replicas 1 --max-replicas 4 --threads 2

Then point any OpenAI client at http://127.0.0.1:8000/v1. One replica is one process with one copy of
each model; give each `--threads` CPU cores (Ray schedules replicas by that), so N replicas on a machine
use N * threads cores. Inside a replica, requests to a model still take turns through its queue; Ray adds
replicas when the requests in flight per replica pass `--target-ongoing` and removes them when idle.
"""

from __future__ import annotations

import argparse
import dataclasses

from onnxllm.serve import ServeOptions, build_app


def replica_options(options: ServeOptions) -> ServeOptions:
    """Resolve catalog names here, once (a first run exports the model), so replicas only load folders."""
    from onnxllm.serve.server import resolve

    return dataclasses.replace(options, models=tuple(str(path) for path in resolve(options).values()))


def application(options: ServeOptions, *, min_replicas: int = 1, max_replicas: int = 2, target_ongoing: int = 2):
    """A Ray Serve application of onnxllm replicas (deploy it with `serve.run`)."""
    from ray import serve

    options = replica_options(options)

    def builder():  # Ray calls a plain function (not a partial) in each replica's process: its own models
        return build_app(options)

    autoscaling = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                   "target_ongoing_requests": target_ongoing}

    # A replica queues up to max_queue requests per model itself; Ray may send it that many at once.
    @serve.deployment(name="onnxllm", autoscaling_config=autoscaling, max_ongoing_requests=options.max_queue + 1,
                      ray_actor_options={"num_cpus": options.threads or 1})
    @serve.ingress(builder)
    class OnnxLLM:
        """One replica: onnxllm's OpenAI-compatible app, built in the replica's own process."""

    return OnnxLLM.bind()


def main() -> None:
    parser = argparse.ArgumentParser(description="onnxllm replicas under Ray Serve")
    parser.add_argument("models", nargs="*", help="catalog names or package folders (default: the catalog default)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--target-ongoing", type=int, default=2, help="requests in flight per replica to aim for")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (and Ray CPUs) per replica")
    parser.add_argument("--api-key")
    args = parser.parse_args()

    from ray import serve

    options = ServeOptions(models=tuple(args.models), api_key=args.api_key, threads=args.threads)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application(options, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                          target_ongoing=args.target_ongoing), blocking=True)


if __name__ == "__main__":
    main()
