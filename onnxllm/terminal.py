"""What the CLI reads from and writes to the terminal: prompts from stdin, text files, progress and
error lines, streamed answers with their stats, and the interactive chat loop. Knows nothing of models
beyond the objects the API returns."""

from __future__ import annotations

import sys

import click

from .errors import OnnxLLMError

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def progress(message: str) -> None:
    click.echo(click.style(f"» {message}", fg="cyan"), err=True)


def fail(message: str) -> None:
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)


def read_prompt(prompt: str | None) -> str | None:
    if prompt is not None:
        return prompt
    if not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise OnnxLLMError(f"stdin is not valid UTF-8 (byte {exc.start}); pipe UTF-8 text") from None
    return None


def read_text_file(path: str) -> str:
    with open(path, "rb") as f:
        try:
            return f.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise OnnxLLMError(f"{path} is not UTF-8 text (byte {exc.start})") from None


def print_stats(timings) -> None:
    if timings is None:
        return
    t = timings.as_dict()
    click.echo(
        click.style(
            f"\n[prompt {t['prompt_tokens']} tok ({t['cached_tokens']} cached), "
            f"prefill {t['prefill_tokens_per_s']} tok/s, "
            f"first token {1000 * t['time_to_first_token_s']:.0f} ms, {t['generated_tokens']} tok at "
            f"{t['decode_tokens_per_s']} tok/s; {t['accepted_tokens']}/{t['drafted_tokens']} drafted tokens accepted]",
            dim=True),
        err=True,
    )


def stream_to_stdout(chunks, *, verbose: bool):
    """Print deltas as they come; on Ctrl-C stop at once, keep what was printed, exit 130."""
    last = None
    try:
        for chunk in chunks:
            if chunk.text:
                click.echo(chunk.text, nl=False)
            last = chunk
    except KeyboardInterrupt:
        click.echo("", err=False)
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo()
    if verbose and last is not None:
        print_stats(last.timings)
    return last


def interactive(model, options: dict, system: str | None, verbose: bool) -> None:
    chat = model.chat(system=system)
    click.echo(click.style(f"chatting with {model.root.name} ({model.variant}, {model.placement.device}); "
                           "/reset clears, /exit or Ctrl-D quits, Ctrl-C stops a reply", dim=True), err=True)
    while True:
        try:
            text = click.prompt(click.style(">>>", fg="green", bold=True), prompt_suffix=" ", default="",
                                show_default=False)
        except (EOFError, KeyboardInterrupt, click.exceptions.Abort):
            click.echo()
            return
        if text.strip() in ("/exit", "/quit", "/bye"):
            return
        if text.strip() == "/reset":
            chat.reset()
            continue
        if not text.strip():
            continue
        last = None  # a turn that fails or is stopped before its first token has no stats to print
        try:
            for chunk in chat.send(text, **options):
                click.echo(chunk.text, nl=False)
                last = chunk
        except KeyboardInterrupt:
            click.echo(click.style(" [stopped]", dim=True), nl=False)
        except OnnxLLMError as exc:
            fail(str(exc))
        click.echo()
        if verbose and last is not None:
            print_stats(last.timings)


def read_lines(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 file: one text each (a corpus, or texts to embed)."""
    lines = [line.strip() for line in read_text_file(path).splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise OnnxLLMError(f"{path} has no non-empty lines; put one text per line")
    return texts
