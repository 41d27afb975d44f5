"""Make docs/serve.png: the chat page answering a question, in headless Chromium.

    python scripts/serve_screenshot.py [MODEL] [--out docs/serve.png]

Starts `onnxllm serve MODEL` in this process on a free loopback port, asks one question through the page,
waits for the streamed answer and saves a screenshot. Needs the [serve] extra, playwright and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from onnxllm.serve import ServeOptions, build_app

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "serve.png"))
    parser.add_argument("--question", default="What are three good reasons to run a language model offline?")
    args = parser.parse_args()

    server = uvicorn.Server(uvicorn.Config(build_app(ServeOptions(models=(args.model,))), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 960, "height": 600})
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.fill("#prompt", args.question)
        page.keyboard.press("Enter")
        page.wait_for_selector(".assistant[data-state=done]", timeout=300_000)
        page.screenshot(path=args.out)
        browser.close()
    server.should_exit = True
    thread.join(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
