"""One module per group of endpoints; each exposes `router`. A new endpoint group (for example
/v1/embeddings) is a new module here plus its line in ROUTERS."""

from __future__ import annotations


def routers() -> list:
    from . import chat, completions, embeddings, models, page

    return [models.router, chat.router, completions.router, embeddings.router, page.router]
