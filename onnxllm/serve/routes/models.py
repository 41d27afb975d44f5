"""GET /v1/models (the names configured at start), GET /v1/models/{id}, GET /health."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request

from ..schemas import ModelCard, ModelList
from .common import registry

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    reg = registry(request)
    return ModelList(data=[ModelCard(id=name, created=reg.slot(name).created) for name in reg.names()])


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request) -> ModelCard:
    slot = registry(request).slot(name)
    return ModelCard(id=slot.name, created=slot.created)


@router.get("/health")
async def health(request: Request) -> dict:
    """Liveness plus per-model state: loaded, running, queued, and request counters; pid tells replicas apart."""
    return {"status": "ok", "pid": os.getpid(), "models": registry(request).status()}
