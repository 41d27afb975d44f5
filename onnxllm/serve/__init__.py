"""An OpenAI-compatible HTTP server over the Python API (`onnxllm serve`), in the [serve] extra.

A thin layer: request and response models (schemas), one error mapping (errors), the models
configured at start with a queue each (registry), OpenAI objects and server-sent events built from
Model.stream (answers, sse), one module per group of routes (routes/), the app (app) and its start
(server). No generation logic lives here. Importing this package needs nothing beyond the runtime;
the modules under it need fastapi and uvicorn.
"""

from __future__ import annotations

import importlib.util

from ..errors import OnnxLLMError
from .config import ServeOptions, parse_duration

__all__ = ["ServeOptions", "build_app", "parse_duration", "require_serve_extra", "run"]

_NEEDED = ("fastapi", "uvicorn", "pydantic")


def require_serve_extra() -> None:
    missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxLLMError(f"`onnxllm serve` needs {', '.join(missing)}, which is not installed; install the server "
                           "with: pip install 'onnxllm[serve]'")


def run(options: ServeOptions, *, progress=None) -> None:
    """Serve `options.models` until Ctrl-C (uvicorn prints the address)."""
    require_serve_extra()
    from .server import run as _run

    _run(options, progress=progress)


def build_app(options: ServeOptions, *, progress=None):
    """The ASGI app (models resolved now, loaded on first use), for running under another ASGI server."""
    require_serve_extra()
    from .server import build_app as _build_app

    return _build_app(options, progress=progress)
