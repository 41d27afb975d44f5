"""examples/ray_serve.py: two onnxllm replicas under Ray Serve, answering through Ray's HTTP proxy.

Skips unless `ray[serve]` is installed (it is heavy, so no extra of onnxllm pulls it in)."""

from __future__ import annotations

import dataclasses
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")
ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'ray[serve]'); "
                                        "the Ray Serve example is not exercised")
serve = pytest.importorskip("ray.serve", reason="ray is installed without serve (pip install 'ray[serve]')")

import onnxllm  # noqa: E402
from onnxllm.serve import ServeOptions  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))


@pytest.fixture
def chat_package(tmp_path):
    from _tiny import make_tiny_package

    from onnxllm.package import read_manifest, write_manifest

    pkg = make_tiny_package(tmp_path, "llama", vocab_size=263)
    (pkg / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", encoding="utf-8")
    write_manifest(pkg, dataclasses.replace(read_manifest(pkg), chat_template="chat_template.jinja"))
    return pkg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_answer_through_ray(chat_package):
    from openai import OpenAI
    from ray_serve import application

    messages = [{"role": "user", "content": "Hello there"}]
    expected = onnxllm.load(chat_package).generate(messages, max_tokens=8).text
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(ServeOptions(models=(str(chat_package),), threads=1), min_replicas=2, max_replicas=2))
        deployment = serve.status().applications["default"].deployments["onnxllm"]
        assert deployment.replica_states.get("RUNNING") == 2, deployment
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == [chat_package.name]
        whole = client.chat.completions.create(model=chat_package.name, messages=messages, max_tokens=8)
        streamed = client.chat.completions.create(model=chat_package.name, messages=messages, max_tokens=8,
                                                  stream=True)
        assert whole.choices[0].message.content == expected
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
        pids = set()
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:  # Ray spreads requests over both replicas
            pids.add(httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()["pid"])
        assert len(pids) == 2
    finally:
        serve.shutdown()
        ray.shutdown()
