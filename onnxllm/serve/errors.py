"""The one mapping from errors to HTTP status and OpenAI's error JSON ({"error": {message, type, param, code}})."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields

from ..errors import ContextOverflowError, EmbeddingError, GenerationError, ModelNotFoundError, OnnxLLMError
from ..runtime.generate import GenerationConfig
from .schemas import ErrorBody, ErrorResponse

log = logging.getLogger("onnxllm.serve")

# Request fields that onnxllm's own messages start with ("temperature must be...", "messages[0]['role']...").
_PARAMS = {f.name for f in fields(GenerationConfig)} | {"messages", "tools", "prompt"}


@dataclass
class APIError(Exception):
    """An error the server raises itself (bad key, unknown model, queue full, ...)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def _param_of(message: str) -> str | None:
    # GenerationConfig.validate and the sampler start their messages with the option's name.
    word = re.match(r"\w*", message).group(0)
    return word if word in _PARAMS else None


def _validation_error(exc) -> APIError:
    """pydantic/FastAPI request validation -> 400 naming the first bad field (`messages.0.role`)."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # Drop pydantic's union-branch labels (`str`, `list[TextPart]`) so the param is a real field path.
    loc = [p for p in loc if not (p[:1].islower() and ("[" in p or p in ("str", "int", "float", "bool")))]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if first.get("type") == "missing":
        return APIError(400, f"missing required field {param!r}", param=param, code="missing_required_parameter")
    if param == "n":
        message = "only n=1 is supported (one choice per request)"
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def to_api_error(exc: BaseException) -> APIError:
    """Every exception a request can end in -> an APIError with its status (500 for the unexpected)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, GenerationError):
        return APIError(400, str(exc), param=_param_of(str(exc)), code="invalid_value")
    if isinstance(exc, EmbeddingError):  # a bad input text, or a package that cannot embed
        return APIError(400, str(exc), param="input", code="invalid_value")
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, str(exc), code="model_not_found")
    if isinstance(exc, OnnxLLMError):  # a package or device problem on the server's side
        return APIError(500, str(exc), type="server_error")
    if isinstance(exc, HTTPException):
        kinds = {404: ("not_found", "not found"), 405: ("method_not_allowed", "method not allowed")}
        code, text = kinds.get(exc.status_code, (None, str(exc.detail)))
        return APIError(exc.status_code, f"{text}: see GET /v1/models and POST /v1/chat/completions",
                        code=code, headers=dict(exc.headers or {}))
    log.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                    type="server_error")


def error_body(error: APIError) -> dict:
    return ErrorResponse(error=ErrorBody(message=error.message, type=error.type, param=error.param,
                                         code=error.code)).model_dump()


def error_response(exc: BaseException):
    """The JSONResponse for any exception (used by the app's exception handlers)."""
    from fastapi.responses import JSONResponse

    error = to_api_error(exc)
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)
