"""GET /: the chat page (one static HTML file, no build step, nothing loaded from outside the machine)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    html = files("onnxllm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
    # The page talks to this server only; forbid everything else so a model's answer can never load a resource.
    csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return HTMLResponse(html, headers={"Content-Security-Policy": csp})
