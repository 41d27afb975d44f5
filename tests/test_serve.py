"""The OpenAI-compatible server on a tiny random model: a real uvicorn server on loopback, the real openai client.

Exact-answer checks against SmolLM2 are in test_serve_real.py; here: shapes, usage, errors, limits, queue,
keep-alive, key, CORS, and the CLI's serve/list/rm.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from _server import LiveServer  # noqa: E402

import onnxllm  # noqa: E402
from onnxllm.cli import cli  # noqa: E402
from onnxllm.errors import OnnxLLMError  # noqa: E402
from onnxllm.package import read_manifest, write_manifest  # noqa: E402
from onnxllm.serve import ServeOptions, parse_duration  # noqa: E402
from onnxllm.serve.config import is_loopback  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NAME = "tiny-chat"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> Path:
    """A tiny random llama with a ChatML template; vocabulary = the tokenizer's, so every token has text."""
    from _tiny import make_tiny_package

    pkg = make_tiny_package(tmp_path_factory.mktemp("tiny_chat"), "llama", vocab_size=263)
    (pkg / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    write_manifest(pkg, dataclasses.replace(read_manifest(pkg), chat_template="chat_template.jinja"))
    served = pkg.parent / NAME
    pkg.rename(served)
    return served


@pytest.fixture(scope="module")
def server(tiny_chat):
    with LiveServer(ServeOptions(models=(str(tiny_chat),), max_queue=4)) as live:
        yield live


@pytest.fixture(scope="module")
def direct(tiny_chat):
    return onnxllm.load(tiny_chat)


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


# -- endpoints --------------------------------------------------------------------------------------
def test_models_and_health(server):
    client = server.openai()
    assert [m.id for m in client.models.list()] == [NAME]
    card = client.models.retrieve(NAME)
    assert card.id == NAME and card.owned_by == "onnxllm"
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and [m["id"] for m in health["models"]] == [NAME]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_whole_equals_stream_equals_api(server, direct):
    client = server.openai()
    whole = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
    expected = direct.generate(MESSAGES, max_tokens=12)
    assert expected.text  # the tiny model's vocabulary is all text, so this compares something
    assert whole.choices[0].message.content == expected.text
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert whole.choices[0].finish_reason == "length" and whole.object == "chat.completion"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    prompt_tokens = len(direct.encode_chat(MESSAGES))
    for usage in (whole.usage, chunks[-1].usage):
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, len(expected.token_ids))
        assert usage.total_tokens == prompt_tokens + len(expected.token_ids)
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_has_no_usage_chunk(server):
    chunks = list(server.openai().chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_sampling_options_reach_the_model(server, direct):
    client = server.openai()
    options = dict(temperature=0.9, top_p=0.8, seed=7, presence_penalty=0.5, frequency_penalty=0.3, max_tokens=10)
    first = client.chat.completions.create(model=NAME, messages=MESSAGES, **options)
    again = client.chat.completions.create(model=NAME, messages=MESSAGES, **options)
    expected = direct.generate(MESSAGES, **options)
    assert first.choices[0].message.content == again.choices[0].message.content == expected.text
    # max_completion_tokens is the newer name of max_tokens, and wins over it
    newer = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, max_completion_tokens=3)
    assert newer.usage.completion_tokens == 3


def test_stop_strings(server, direct):
    full = direct.generate(MESSAGES, max_tokens=20).text
    stop = full[3:5]
    assert stop and full.find(stop) >= 0
    answer = server.openai().chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=20, stop=[stop])
    assert answer.choices[0].message.content == full[:full.find(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_completions_raw_text(server, direct):
    client = server.openai()
    expected = direct.generate("Once upon a time", max_tokens=8)
    whole = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8)
    streamed = list(client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    assert whole.choices[0].text == expected.text and whole.object == "text_completion"
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text
    assert whole.usage.completion_tokens == streamed[-1].usage.completion_tokens == len(expected.token_ids)
    assert whole.usage.prompt_tokens == len(direct.encode("Once upon a time"))
    echoed = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + expected.text


def test_default_max_tokens_is_clipped_to_the_context(server, direct):
    long = "ab " * 66  # ~200 tokens of a 256-token context: the package default (256) cannot fit
    answer = server.openai().completions.create(model=NAME, prompt=long)
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens <= direct.session.context


# -- errors -----------------------------------------------------------------------------------------
OK = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
BAD_REQUESTS = [
    ({**OK, "model": "other"}, 404, "model", "model_not_found"),
    ({**OK, "temperature": 3}, 400, "temperature", "invalid_value"),
    ({**OK, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({**OK, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({**OK, "max_tokens": 100000}, 400, "max_tokens", "context_length_exceeded"),
    ({**OK, "presence_penalty": 9}, 400, "presence_penalty", "invalid_value"),
    ({**OK, "n": 2}, 400, "n", "invalid_value"),
    ({**OK, "messages": []}, 400, "messages", "invalid_value"),
    ({"model": NAME}, 400, "messages", "missing_required_parameter"),
    ({"messages": OK["messages"]}, 400, "model", "missing_required_parameter"),
    ({**OK, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "invalid_value"),
    ({**OK, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "invalid_value"),
    ({**OK, "messages": [{"role": "user", "content": "a\x00b"}]}, 400, None, "invalid_value"),
    ({**OK, "stop": 5}, 400, "stop", "invalid_value"),
    ({**OK, "response_format": {"type": "xml"}}, 400, "response_format.type", "invalid_value"),
    ({**OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "invalid_value"),  # no tools
    ({**OK, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, "tools.0.function.name",
     "invalid_value"),
]


@pytest.mark.parametrize("body,status,param,code", BAD_REQUESTS)
def test_bad_request_status_and_error_json(server, body, status, param, code):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    error = _error(response)
    assert (response.status_code, error["param"], error["code"]) == (status, param, code), error


def test_bad_completion_requests(server):
    url = f"{server.url}/v1/completions"
    for body, param in (({"model": NAME, "prompt": ["a", "b"]}, "prompt"),
                        ({"model": NAME, "prompt": "a", "suffix": "b"}, "suffix"),
                        ({"model": NAME, "prompt": ""}, None)):
        response = httpx.post(url, json=body)
        assert response.status_code == 400 and _error(response)["param"] == param


def test_malformed_bodies_and_unknown_routes(server):
    bad_json = httpx.post(f"{server.url}/v1/chat/completions", content=b"{nope",
                          headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and _error(bad_json)["code"] == "invalid_json"
    not_object = httpx.post(f"{server.url}/v1/chat/completions", json=[1, 2])
    assert not_object.status_code == 400 and _error(not_object)
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    wrong_method = httpx.get(f"{server.url}/v1/chat/completions")
    assert wrong_method.status_code == 405 and _error(wrong_method)["code"] == "method_not_allowed"


def test_body_limit_413(tiny_chat):
    with LiveServer(ServeOptions(models=(str(tiny_chat),), max_body_bytes=2048)) as live:
        big = {**OK, "messages": [{"role": "user", "content": "x" * 4096}]}
        response = httpx.post(f"{live.url}/v1/chat/completions", json=big)
        assert response.status_code == 413 and _error(response)["code"] == "body_too_large"

        def chunked():  # no Content-Length: the limit counts the bytes as they come
            yield json.dumps(big).encode()[:1500]
            yield json.dumps(big).encode()[1500:]

        response = httpx.post(f"{live.url}/v1/chat/completions", content=chunked(),
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert live.openai().chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2).choices


def test_api_key_enforced(tiny_chat):
    with LiveServer(ServeOptions(models=(str(tiny_chat),), api_key="s3cret")) as live:
        with pytest.raises(openai.AuthenticationError):
            live.openai(api_key="wrong").models.list()
        not_bearer = httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Basic czNjcmV0"})
        assert not_bearer.status_code == 401
        missing = httpx.post(f"{live.url}/v1/chat/completions", json=OK)
        assert missing.status_code == 401 and _error(missing)["code"] == "invalid_api_key"
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert httpx.get(f"{live.url}/health").status_code == 200  # probes need no key
        client = live.openai(api_key="s3cret")
        assert [m.id for m in client.models.list()] == [NAME]
        assert client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2).usage.completion_tokens == 2


def test_cors_off_unless_asked(server, tiny_chat):
    origin = {"Origin": "http://localhost:3000"}
    assert "access-control-allow-origin" not in httpx.get(f"{server.url}/v1/models", headers=origin).headers
    with LiveServer(ServeOptions(models=(str(tiny_chat),), cors_origins=("http://localhost:3000",),
                                 api_key="k")) as live:
        preflight = httpx.options(f"{live.url}/v1/chat/completions",
                                  headers={**origin, "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.get(f"{live.url}/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# -- queue, cancel, keep-alive ----------------------------------------------------------------------
def _hold(live: LiveServer, name: str) -> threading.Event:
    """Occupy the model's worker until the returned event is set (a request that waits before generating)."""
    gate = threading.Event()

    def start(model, cancel):
        gate.wait(30)
        yield from model.stream("x", max_tokens=1, cancel=cancel)

    live.call(live.registry.open, name, start)
    return gate


def test_full_queue_is_503_with_retry_after(tiny_chat):
    with LiveServer(ServeOptions(models=(str(tiny_chat),), max_queue=1)) as live:
        gate = _hold(live, NAME)
        try:
            waiting = threading.Thread(target=lambda: httpx.post(f"{live.url}/v1/chat/completions", json=OK,
                                                                 timeout=60))
            waiting.start()
            deadline = time.monotonic() + 30
            while live.registry.status()[0]["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            response = httpx.post(f"{live.url}/v1/chat/completions", json=OK)
            assert response.status_code == 503 and _error(response)["code"] == "queue_full"
            assert int(response.headers["Retry-After"]) >= 1
        finally:
            gate.set()
        waiting.join(60)
        assert live.wait_idle(NAME)["rejected"] == 1


def test_client_leaving_while_queued_is_never_generated_for(tiny_chat):
    with LiveServer(ServeOptions(models=(str(tiny_chat),))) as live:
        gate = _hold(live, NAME)
        try:
            with pytest.raises(httpx.TimeoutException):  # gives up while queued: the connection closes
                httpx.post(f"{live.url}/v1/chat/completions", json={**OK, "stream": True}, timeout=0.5)
            time.sleep(0.2)  # let the server read the disconnect (nothing is asserted on time)
        finally:
            gate.set()
        entry = live.wait_idle(NAME)
        assert (entry["served"], entry["cancelled"]) == (1, 1), entry


def test_keep_alive_unloads_and_reloads(tiny_chat):
    with LiveServer(ServeOptions(models=(str(tiny_chat),), keep_alive_s=0.2)) as live:
        assert live.registry.status()[0]["loaded"] is False  # nothing loads before the first request
        client = live.openai()
        first = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3)
        deadline = time.monotonic() + 30
        while live.registry.status()[0]["loaded"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.registry.status()[0]["loaded"] is False
        again = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3)
        assert again.choices[0].message.content == first.choices[0].message.content


# -- options and CLI --------------------------------------------------------------------------------
def test_options():
    assert [parse_duration(x) for x in ("300", "30s", "5m", "1h", "1m30s", "0", "-1")] == \
        [300, 30, 300, 3600, 90, 0, None]
    with pytest.raises(OnnxLLMError, match="--keep-alive"):
        parse_duration("soon")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert ServeOptions().warnings() == []
    assert "--api-key" in ServeOptions(host="0.0.0.0").warnings()[0]
    assert ServeOptions(host="0.0.0.0", api_key="k").warnings() == []
    for bad in (dict(api_key=" "), dict(cors_origins=("localhost",)), dict(port=70000)):
        with pytest.raises(OnnxLLMError):
            ServeOptions(**bad).validate()


def test_models_are_fixed_at_start(tiny_chat, tmp_path):
    with pytest.raises(OnnxLLMError, match="does not exist"):
        LiveServer(ServeOptions(models=(str(tmp_path / "missing"),)))
    twin = tmp_path / NAME
    shutil.copytree(tiny_chat, twin)
    with pytest.raises(OnnxLLMError, match="two models"):
        LiveServer(ServeOptions(models=(str(tiny_chat), str(twin))))
    with LiveServer(ServeOptions(models=(str(tiny_chat),))) as live:  # a path in a request is only a name
        response = httpx.post(f"{live.url}/v1/chat/completions", json={**OK, "model": str(tiny_chat)})
        assert response.status_code == 404


def test_cli_warns_before_exposing_the_server_without_a_key(tmp_path):
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "missing"), "--host", "0.0.0.0"])
    assert "warning: listening on 0.0.0.0 without --api-key" in result.output  # printed before anything starts
    assert result.exit_code == 1 and "does not exist" in result.output
    quiet = CliRunner().invoke(cli, ["serve", str(tmp_path / "missing"), "--host", "0.0.0.0", "--api-key", "k"])
    assert "warning" not in quiet.output and quiet.exit_code == 1
    bad = CliRunner().invoke(cli, ["serve", "--keep-alive", "soon"])
    assert bad.exit_code == 1 and "--keep-alive" in bad.output


def test_serve_without_the_extra_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    result = CliRunner().invoke(cli, ["serve", "x"])
    assert result.exit_code == 1 and "pip install 'onnxllm[serve]'" in result.output


def test_cli_list_and_rm(tiny_chat, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXLLM_CACHE", str(tmp_path))
    shutil.copytree(tiny_chat, tmp_path / "tiny")
    (tmp_path / "not-a-package").mkdir()
    runner = CliRunner()
    listed = runner.invoke(cli, ["list"])
    assert listed.exit_code == 0, listed.output
    assert re.search(r"^tiny\s+\d+(\.\d)? [KM]B\s+fp32\s+llama\s+hf ", listed.output.splitlines()[1])
    assert "not-a-package" not in listed.output
    rows = json.loads(runner.invoke(cli, ["list", "--json"]).output)
    assert [r["name"] for r in rows] == ["tiny"] and rows[0]["family"] == "llama"
    assert onnxllm.load("tiny").root == tmp_path / "tiny"  # a listed name is a model name everywhere
    for bad in ("nope", "../tiny", "not-a-package"):
        result = runner.invoke(cli, ["rm", bad])
        assert result.exit_code == 1 and "onnxllm list" in result.output
    removed = runner.invoke(cli, ["rm", "tiny"])
    assert removed.exit_code == 0 and removed.output.startswith("removed tiny (")
    assert not (tmp_path / "tiny").exists() and (tmp_path / "not-a-package").is_dir()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["not-a-package"]


def test_cli_serve_with_api_key(tiny_chat):
    proc = subprocess.Popen([sys.executable, "-m", "onnxllm.cli", "serve", str(tiny_chat), "--port", "0",
                             "--api-key", "k3y", "--keep-alive", "1m"],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line, flags=re.I)
            if match:
                url = match.group(1)
                break
        assert url, "the server did not print its address"
        from openai import OpenAI

        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()
        client = OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        answer = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3)
        assert answer.usage.completion_tokens == 3
    finally:
        proc.terminate()
        proc.wait(30)


def test_readme_client_example(server):
    """The README's openai-client example, pointed at this server and model."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    code = next(c for c in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "base_url" in c)
    code = code.replace("http://127.0.0.1:8080/v1", f"{server.url}/v1").replace("smollm2-135m-instruct", NAME)
    code = code.replace("stream=True,", "stream=True, max_tokens=5,")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_prefix_reuse_across_requests(server, direct):
    """Requests that share a system prompt prefill only what differs (the KV cache stays the model's)."""
    client = server.openai()
    system = {"role": "system", "content": "You answer in one word. " * 3}
    first = client.chat.completions.create(model=NAME, messages=[system, {"role": "user", "content": "Sky?"}],
                                           max_tokens=2)
    second = client.chat.completions.create(model=NAME, messages=[system, {"role": "user", "content": "Sea?"}],
                                            max_tokens=2)
    a, b = (direct.encode_chat([system, {"role": "user", "content": q}]) for q in ("Sky?", "Sea?"))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared > 100 and second.usage.prompt_tokens_details.cached_tokens == shared
    assert first.usage.prompt_tokens == second.usage.prompt_tokens


def test_logprobs_whole_streamed_and_legacy(server, direct):
    client = server.openai()
    expected = direct.generate(MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, logprobs=True,
                                           top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert [t.token for t in content] == [lp.text for lp in expected.logprobs]
    assert [t.logprob for t in content] == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-5)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-9 for t in content)
    streamed = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, logprobs=True,
                                                   top_logprobs=3, stream=True))
    pieces = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in pieces] == [t.token for t in content]
    assert [t.logprob for t in pieces] == pytest.approx([t.logprob for t in content], abs=1e-5)
    assert all(c.choices[0].logprobs is None for c in
               client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2, stream=True) if c.choices)
    legacy = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=4, logprobs=2)
    raw = direct.generate("Once upon a time", max_tokens=4, logprobs=True, top_logprobs=2)
    lp = legacy.choices[0].logprobs
    assert lp.tokens == [x.text for x in raw.logprobs] and len(lp.top_logprobs[0]) <= 2
    assert lp.token_logprobs == pytest.approx([x.logprob for x in raw.logprobs], abs=1e-5)
    for body, param in (({**OK, "top_logprobs": 2}, "top_logprobs"), ({**OK, "logprobs": True, "top_logprobs": 21},
                                                                      "top_logprobs")):
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert response.status_code == 400 and _error(response)["param"] == param
