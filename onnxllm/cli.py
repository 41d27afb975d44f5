"""The `onnxllm` command: each command parses, calls one API function (onnxllm.api, the only
onnxllm module it imports besides errors, version, terminal.py (its I/O) and the server, a front end of its
own) and prints."""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
import time

import click

from . import api
from .api import BenchOptions, GenerationConfig
from .errors import OnnxLLMError
from .terminal import (EXIT_ERROR, EXIT_INTERRUPTED, fail, interactive, progress, read_lines, read_prompt,
                       read_text_file, stream_to_stdout)
from .version import __version__

def handle_errors(fn):
    """Known errors -> one line and exit 1; Ctrl-C -> exit 130; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        root = click.get_current_context().find_root()
        debug = root.params.get("debug", False)
        interrupted = (root.obj or {}).get("interrupted")
        try:
            return fn(*args, **kwargs)
        except OnnxLLMError as exc:
            if debug:
                raise
            fail(str(exc))
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except OSError as exc:
            if debug:
                raise
            fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
            sys.exit(EXIT_ERROR)
        except Exception:
            # Ctrl-C inside a C extension's import surfaces as ImportError, not KeyboardInterrupt.
            if interrupted is not None and interrupted.is_set() and not debug:
                click.echo("\ninterrupted", err=True)
                sys.exit(EXIT_INTERRUPTED)
            raise

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxllm")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Run large language models offline with ONNX Runtime."""
    ctx.ensure_object(dict)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: notes Ctrl-C so an interrupted import still exits 130."""
    interrupted = threading.Event()

    def on_sigint(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
    cli.main(args=argv, prog_name="onnxllm", obj={"interrupted": interrupted})


@cli.command(epilog=f"Supported architectures (config.json model_type): {', '.join(api.supported_architectures())}. "
                    "How to add one: docs/ARCHITECTURES.md.")
@click.argument("source")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Package folder to write.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check ONNX against PyTorch.")
@click.option("--force", is_flag=True, help="Replace an existing package.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own Python code (off by default).")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) weights, which can run code.")
@handle_errors
def export(source, out_dir, dtype, verify, force, trust_remote_code, allow_pickle):
    """Export SOURCE (HF folder, .gguf, catalog name or hub id) to an ONNX model package."""
    start = time.perf_counter()
    path = api.export(source, out_dir, dtype=dtype, verify=verify, force=force,
                      trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress)
    click.echo(f"exported {source} -> {path} in {time.perf_counter() - start:.1f}s")


@cli.command()
@click.argument("package", type=click.Path())
@click.option("--scheme", type=click.Choice(["int8", "int4", "int8-dynamic", "gguf", "int4-exact"]), required=True,
              help="int8: 8-bit; int4: smallest; int8-dynamic: int8 with a faster prefill (CPU); "
                   "gguf: the source GGUF's own blocks, each tensor at its own precision (lossless); "
                   "int4-exact: a GGUF's 4-bit weights with float32 arithmetic in the layers (the CPU default)")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True)
@click.option("--asymmetric", is_flag=True, help="Asymmetric (zero-point) quantization.")
@click.option("--exclude", multiple=True, help="Node name or glob pattern to keep in full precision (repeatable).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
              help="MatMulNBits compute: 4 = int8 activations (fast on CPU), 1 = fp32 (exact, slow).")
@click.option("--lm-head-bits", type=click.Choice(["8", "4", "0"]), help="lm_head/embedding bits (0 = fp32).")
@click.option("--no-gguf", is_flag=True, help="Re-quantize even when the GGUF's own blocks could be imported.")
@click.option("--force", is_flag=True, help="Replace the variant if it exists.")
@click.option("--no-eval", is_flag=True, help="Skip the fidelity check (4,096 corpus tokens, three routes).")
@handle_errors
def quantize(package, scheme, block_size, asymmetric, exclude, accuracy_level, lm_head_bits, no_gguf, force, no_eval):
    """Add an int8, int4 or int8-dynamic variant to PACKAGE and measure what it costs in quality."""
    head = int(lm_head_bits) if lm_head_bits is not None else None
    result = api.quantize(package, scheme, block_size=int(block_size), symmetric=not asymmetric,
                          exclude=tuple(exclude), accuracy_level=accuracy_level, lm_head_bits=head,
                          embed_bits=head, from_gguf=False if no_gguf else "auto", force=force,
                          evaluate=not no_eval, progress=progress)
    click.echo(str(result))


@cli.command(name="import")
@click.argument("folder", type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(), required=True, help="Package folder to write.")
@click.option("--copy", is_flag=True, help="Copy the graphs and weights (default: hard links where possible).")
@click.option("--force", is_flag=True, help="Replace an existing package at OUTPUT.")
@handle_errors
def import_cmd(folder, out, copy, force):
    """Make an onnxllm package from an onnxruntime-genai, optimum or transformers.js FOLDER (no re-export)."""
    path = api.import_folder(folder, out, copy=copy, force=force)
    click.echo(f"imported {folder} -> {path}")


def _generation_options(gen: dict) -> dict:
    """The options given; --json-schema (a file unless it is JSON text) and --grammar files become their text."""
    options = {k: v for k, v in gen.items() if v not in (None, ())}
    schema = options.get("json_schema")
    if schema is not None and not schema.lstrip().startswith("{"):
        options["json_schema"] = read_text_file(schema)
    if "grammar" in options:
        options["grammar"] = read_text_file(options["grammar"])
    return options


def generation_options(fn):
    opts = [
        click.option("--max-tokens", type=int, help="Most tokens to generate."),
        click.option("--temperature", type=float, help="0 = greedy."),
        click.option("--top-k", type=int),
        click.option("--top-p", type=float),
        click.option("--min-p", type=float),
        click.option("--repetition-penalty", type=float),
        click.option("--presence-penalty", type=float),
        click.option("--frequency-penalty", type=float),
        click.option("--seed", type=int),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--context-overflow", type=click.Choice(["error", "truncate"]),
                     help="When a chat outgrows the context: fail (default) or drop the oldest turns."),
        click.option("--draft-tokens", type=int,
                     help="Speculative decoding by prompt lookup: most tokens guessed per step "
                          f"(default {GenerationConfig.draft_tokens}; 0 = off)."),
        click.option("--json-schema", help="Answer in JSON that validates against this schema (a file or JSON text)."),
        click.option("--json-object", is_flag=True, default=None, help="Answer with any JSON object."),
        click.option("--regex", help="Answer with text that matches this regular expression."),
        click.option("--grammar", type=click.Path(dir_okay=False),
                     help="Answer in this grammar (a Lark or GBNF file)."),
        click.option("--min-tokens", type=click.IntRange(0),
                     help="Generate at least N tokens (EOS held back until then)."),
        click.option("--ignore-eos", is_flag=True, default=None,
                     help="Do not stop at EOS: run to --max-tokens (or a stop string)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@cli.command()
@click.argument("model")
@click.argument("prompt", required=False)
@generation_options
@click.option("--system", help="System prompt (chat mode).")
@click.option("--chat/--raw", "chat_mode", default=None,
              help="Apply the chat template (default: when the model has one).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "dml"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: all cores).")
@click.option("--context", type=click.IntRange(1), help="Context length to allow (default: the model's).")
@click.option("--variant", help="Package variant (fp32, int8, int4...; default: best for the device).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result.")
@click.option("--logprobs", "top_logprobs", type=click.IntRange(0, 20),
              help="With --json: each token's log-probability and the N most likely tokens at each step.")
@click.option("-v", "--verbose", is_flag=True, help="Print prefill/decode speed and time to first token.")
@handle_errors
def run(model, prompt, system, chat_mode, device, threads, context, variant, as_json, top_logprobs, verbose, **gen):
    """Generate from MODEL (package, model.onnx or catalog name). No PROMPT on a terminal: chat."""
    options = _generation_options(gen)
    if top_logprobs is not None:
        if not as_json:
            raise OnnxLLMError("--logprobs goes with --json (the log-probabilities are printed in the JSON result)")
        options.update(logprobs=True, top_logprobs=top_logprobs)
    m = api.load(model, device=device, variant=variant, threads=threads, context=context, progress=progress)
    m.config(**options)  # validate before reading stdin or starting a chat
    if verbose:
        for note in m.notes:
            click.echo(note, err=True)
    if m.placement.fallback_reason and (verbose or device != "auto"):
        click.echo(click.style(m.placement.fallback_reason, fg="yellow"), err=True)
    text = read_prompt(prompt)
    use_chat = (m.template is not None) if chat_mode is None else chat_mode
    if text is None:
        if m.template is None:
            raise OnnxLLMError("this model has no chat template, so it cannot chat; give a PROMPT to complete")
        interactive(m, options, system, verbose)
        return
    if as_json:
        result = m.generate(text, chat=use_chat, system=system, **options)
        out = {"text": result.text, "tokens": result.token_ids, "finish_reason": result.finish_reason,
               "timings": result.timings.as_dict() if result.timings else None,
               "model": str(m.root), "variant": m.variant, "device": m.placement.device}
        if top_logprobs is not None:
            out["logprobs"] = [{"token": lp.token, "text": lp.text, "logprob": lp.logprob,
                                "top": [{"token": t, "text": x, "logprob": v} for t, x, v in lp.top]}
                               for lp in result.logprobs]
        click.echo(json.dumps(out, ensure_ascii=False))
        return
    stream_to_stdout(m.stream(text, chat=use_chat, system=system, **options), verbose=verbose)


@cli.command()
@click.argument("model")
@click.option("--system", help="System prompt.")
@generation_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "dml"]), default="auto", show_default=True)
@click.option("--variant")
@click.option("-v", "--verbose", is_flag=True)
@handle_errors
def chat(model, system, device, variant, verbose, **gen):
    """Interactive multi-turn chat with MODEL."""
    options = _generation_options(gen)
    m = api.load(model, device=device, variant=variant, progress=progress)
    m.config(**options)
    if verbose:
        for note in m.notes:
            click.echo(note, err=True)
    interactive(m, options, system, verbose)


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def info(model, as_json):
    """Architecture, context, variants (sizes, how made, quality), EOS ids, providers."""
    data = api.info(model, progress=progress)
    click.echo(json.dumps(data, indent=2, default=str) if as_json else api.format_info(data))


@cli.command(name="eval")
@click.argument("package", type=click.Path())
@click.option("--variant", help="Variant to evaluate (default: every quantized one).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 text (default: the fidelity corpus: prose, verse, dialogue, code, chat).")
@click.option("--tokens", type=click.IntRange(2), default=4096, show_default=True, help="Tokens of text to score.")
@handle_errors
def eval_cmd(package, variant, text_file, tokens):
    """Perplexity, and KL / top-1 / greedy agreement against fp32, along prefill, decode and draft passes."""
    text = read_text_file(text_file) if text_file else None
    for report in api.evaluate(package, variant, text=text, tokens=tokens):
        click.echo(api.format_quality(report))


@cli.command()
@click.argument("model")
@click.option("--variant")
@click.option("--prompt-tokens", default="64,512", show_default=True, help="Comma-separated prompt lengths.")
@click.option("--gen-tokens", type=click.IntRange(2), default=128, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(1))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "dml"]), default="auto", show_default=True)
@click.option("--draft-tokens", type=click.IntRange(0, 64), default=BenchOptions.draft_tokens, show_default=True,
              help="Prompt-lookup draft tokens per step, as generation uses them (0 = one token per step).")
@click.option("--prefill-chunk", type=click.IntRange(0), default=BenchOptions.prefill_chunk, show_default=True,
              help="Prompt tokens per prefill pass (0 = the whole prompt in one).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="Take the prompts from this UTF-8 text (default: random token ids).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def bench(model, variant, prompt_tokens, gen_tokens, runs, threads, device, draft_tokens, prefill_chunk, text_file,
          as_json):
    """Prefill and decode tokens/s, time to first token, load time, peak memory."""
    try:
        lengths = tuple(int(x) for x in prompt_tokens.split(",") if x.strip())
    except ValueError:
        raise OnnxLLMError(
            f"--prompt-tokens takes comma-separated integers like 64,512, got {prompt_tokens!r}") from None
    if not lengths or min(lengths) < 1:
        raise OnnxLLMError(f"--prompt-tokens must list lengths >= 1, got {prompt_tokens!r}")
    text = read_text_file(text_file) if text_file else None
    result = api.bench(model, BenchOptions(variant=variant, prompt_tokens=lengths, gen_tokens=gen_tokens, runs=runs,
                                           threads=threads, device=device, draft_tokens=draft_tokens,
                                           prefill_chunk=prefill_chunk, text=text),
                       progress=progress)
    click.echo(json.dumps(result, indent=2) if as_json else api.format_bench(result))


def _load_embedding(model: str, variant: str | None, device: str, threads: int | None):
    # A text-generation package loads too; its embed() is the one-line "no embedding mode" error.
    return api.load(model, device=device, variant=variant, threads=threads, progress=progress)


def embedding_options(fn):
    opts = [
        click.option("--variant", help="Package variant (fp32, int8; default: best for the device)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "dml"]), default="auto", show_default=True),
        click.option("--threads", type=click.IntRange(1), help="CPU threads (default: all cores)."),
        click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON result."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@cli.command()
@click.argument("model")
@click.argument("texts", nargs=-1)
@click.option("--file", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 file, one text per line (added after the TEXT arguments).")
@click.option("--normalize/--no-normalize", default=None, help="L2-normalize (default: as the model was trained).")
@click.option("--truncate/--no-truncate", default=True, show_default=True,
              help="Cut texts over the model's token limit (and say so), or refuse them.")
@embedding_options
@handle_errors
def embed(model, texts, text_file, normalize, truncate, variant, device, threads, batch_size, as_json):
    """Embed TEXT... (or --file, or stdin lines) with an embedding MODEL: one vector per line."""
    items = list(texts) + (read_lines(text_file) if text_file else [])
    if not items:
        piped = read_prompt(None)
        items = [line.strip() for line in (piped or "").splitlines() if line.strip()]
    if not items:
        raise OnnxLLMError("nothing to embed: give TEXT arguments, --file FILE, or pipe lines on stdin")
    m = _load_embedding(model, variant, device, threads)
    vectors = m.embed(items, batch_size=batch_size, normalize=normalize, truncate=truncate)
    if vectors.truncated:
        which = ", ".join(str(i) for i in vectors.truncated)
        click.echo(click.style(f"truncated to {m.max_tokens} tokens: text(s) {which}", fg="yellow"), err=True)
    if as_json:
        click.echo(json.dumps({"model": str(m.root), "variant": m.variant, "dimension": int(vectors.shape[1]),
                               "embeddings": vectors.tolist(), "tokens": list(vectors.token_counts),
                               "truncated": list(vectors.truncated)}))
        return
    for row in vectors:
        click.echo(" ".join(f"{x:.6g}" for x in row))


@cli.command()
@click.argument("model")
@click.argument("query")
@click.option("--corpus", "corpus_file", type=click.Path(exists=True, dir_okay=False), required=True,
              help="UTF-8 file, one document per line.")
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True, help="How many hits to show.")
@embedding_options
@handle_errors
def search(model, query, corpus_file, top_k, variant, device, threads, batch_size, as_json):
    """Rank the lines of --corpus by cosine similarity to QUERY; print the top hits."""
    corpus = read_lines(corpus_file)
    m = _load_embedding(model, variant, device, threads)
    hits = api.search(m, query, corpus, top_k=top_k, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps([{"rank": r, "index": h.index, "score": h.score, "text": h.text}
                               for r, h in enumerate(hits, 1)], ensure_ascii=False))
        return
    for r, h in enumerate(hits, 1):
        click.echo(f"{r:>2}. {h.score:.4f}  {h.text}")


@cli.command()
@click.argument("models", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 = any free port.")
@click.option("--api-key", envvar="ONNXLLM_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (or set ONNXLLM_API_KEY).")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="Requests that may wait for one model; more get 503 with Retry-After.")
@click.option("--keep-alive", default="5m", show_default=True,
              help="Unload a model after this idle time (300, 30s, 5m, 1h; -1 = never).")
@click.option("--cors", multiple=True, metavar="ORIGIN", help="Let web pages from ORIGIN call the API (repeatable).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "dml"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1), help="CPU threads per model (default: all cores).")
@click.option("--context", type=click.IntRange(1), help="Context length to allow (default: the model's).")
@handle_errors
def serve(models, host, port, api_key, max_queue, keep_alive, cors, device, threads, context):
    """OpenAI-compatible HTTP server for MODELs (catalog names, package folders, cached names; default: the
    catalog default). Chat page at /, API under /v1."""
    from .serve import ServeOptions, parse_duration, run as run_server

    options = ServeOptions(models=tuple(models), host=host, port=port, api_key=api_key, max_queue=max_queue,
                           keep_alive_s=parse_duration(keep_alive), cors_origins=tuple(cors), device=device,
                           threads=threads, context=context).validate()
    for warning in options.warnings():
        click.echo(click.style(f"warning: {warning}", fg="yellow"), err=True)
    run_server(options, progress=progress)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def list_cmd(as_json):
    """Models in the cache folder: name, size, variants, family, source."""
    models = api.list_models()
    if as_json:
        click.echo(json.dumps([m.as_dict() for m in models], indent=2))
        return
    if not models:
        click.echo(f"no models in {api.cache_dir()}; `onnxllm run smollm2-135m-instruct` makes one", err=True)
        return
    rows = [("NAME", "SIZE", "VARIANTS", "FAMILY", "SOURCE")]
    rows += [(m.name, _human_bytes(m.bytes), ",".join(m.variants), m.family, m.source) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])


@cli.command(name="rm")
@click.argument("names", nargs=-1, required=True)
@handle_errors
def rm_cmd(names):
    """Delete models from the cache folder by the names `onnxllm list` shows."""
    for name in names:
        removed = api.remove_model(name)
        click.echo(f"removed {removed.name} ({_human_bytes(removed.bytes)})")


@cli.command()
@handle_errors
def doctor():
    """What is installed, which execution providers work here, what to fix."""
    click.echo(api.format_doctor(api.doctor()))


if __name__ == "__main__":
    main()
