"""What every route module uses: the registry of the app, and the request-level checks."""

from __future__ import annotations

from fastapi import Request

from ..errors import APIError
from ..registry import Registry


def registry(request: Request) -> Registry:
    return request.app.state.registry


def refuse(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")
