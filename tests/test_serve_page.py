"""The chat page at GET /, driven in a real headless Chromium (Debian's `chromium` package, through Playwright)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
playwright_api = pytest.importorskip("playwright.sync_api")

from _server import LiveServer  # noqa: E402

import onnxllm  # noqa: E402
from onnxllm.serve import ServeOptions  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def chat_package(tmp_path_factory):
    """A tiny model with a ChatML template and a vocabulary of text tokens only."""
    import dataclasses

    from _tiny import make_tiny_package

    from onnxllm.package import read_manifest, write_manifest

    pkg = make_tiny_package(tmp_path_factory.mktemp("page"), "llama", vocab_size=263)
    (pkg / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", encoding="utf-8")
    write_manifest(pkg, dataclasses.replace(read_manifest(pkg), chat_template="chat_template.jinja"))
    return pkg


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


def test_page_is_self_contained(chat_package):
    with LiveServer(ServeOptions(models=(str(chat_package),))) as live:
        page = httpx.get(f"{live.url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere


def test_page_streams_an_answer_and_stops_one(chat_package, browser):
    model = onnxllm.load(chat_package)
    question = "Tell me about ONNX."
    expected = model.generate([{"role": "user", "content": question}]).text  # the page sends no max_tokens
    with LiveServer(ServeOptions(models=(str(chat_package),))) as live:
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(live.url)
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        assert page.locator("#model option").all_inner_texts() == [chat_package.name]
        page.fill("#prompt", question)
        page.keyboard.press("Enter")
        page.wait_for_selector(".assistant[data-state=done]", timeout=120_000)
        answer = page.eval_on_selector(".assistant", "el => el.firstChild ? el.firstChild.textContent : ''")
        assert answer == expected
        assert "generated" in page.inner_text(".assistant .stats")
        assert page.eval_on_selector(".user", "el => el.textContent") == question
        assert all(url.startswith(live.url) for url in requests), requests

        # Stop: the request waits behind a held model, Stop aborts it, and the server never generates for it.
        gate = threading.Event()

        def held(model, cancel):
            gate.wait(30)
            yield from model.stream("x", max_tokens=1, cancel=cancel)

        live.call(live.registry.open, chat_package.name, held)
        page.fill("#prompt", "And now a long story.")
        page.click("#send")
        page.wait_for_function("!document.querySelector('#stop').disabled")
        page.click("#stop")
        page.wait_for_selector(".assistant[data-state=stopped]", timeout=30_000)
        assert page.inner_text(".note") == "stopped"
        gate.set()
        entry = live.wait_idle(chat_package.name)
        assert entry["cancelled"] == 1, entry
        page.close()
