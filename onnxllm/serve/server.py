"""Start a server: resolve the configured models (catalog names are pulled now, not on a request), run uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import OnnxLLMError
from .config import ServeOptions

Progress = Callable[[str], None]


def resolve(options: ServeOptions, *, progress: Progress | None = None) -> dict[str, Path]:
    """Served name -> package folder. A catalog name is served under that name, a folder under its own name."""
    from ..api import resolve_served_model
    from ..catalog import DEFAULT_MODEL

    served: dict[str, Path] = {}
    for spec in options.models or (DEFAULT_MODEL,):
        name, path = resolve_served_model(spec, progress=progress)
        if name in served and served[name] != path:
            raise OnnxLLMError(f"two models would be served as {name!r} ({served[name]} and {path}); "
                               "rename one package folder")
        served[name] = path
    return served


def build_app(options: ServeOptions, *, progress: Progress | None = None):
    """The ASGI app for `options`: models resolved now, loaded on their first request."""
    from ..api import load
    from .app import create_app
    from .registry import Registry

    options = options.validate()
    models = resolve(options, progress=progress)

    def loader(path: Path):
        return load(path, device=options.device, threads=options.threads, context=options.context)

    registry = Registry(models, loader, max_queue=options.max_queue, keep_alive_s=options.keep_alive_s)
    return create_app(registry, options)


def run(options: ServeOptions, *, progress: Progress | None = None) -> None:
    """Serve until Ctrl-C (uvicorn prints the address it listens on)."""
    import uvicorn

    app = build_app(options, progress=progress)
    uvicorn.run(app, host=options.host, port=options.port, log_level="info", timeout_graceful_shutdown=5)
