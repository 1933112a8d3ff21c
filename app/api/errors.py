"""Every error leaves as JSON {"error": {"type", "message", "field"}} with a fixed status per kind."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.errors import EngineError, EngineStopped, InvalidRequest, Overloaded, RequestTimeout

log = logging.getLogger(__name__)

STATUS: dict[type[EngineError], int] = {
    InvalidRequest: 422,
    Overloaded: 429,
    RequestTimeout: 504,
    EngineStopped: 503,
}


def status_for(error: EngineError) -> int:
    for kind, status in STATUS.items():
        if isinstance(error, kind):
            return status
    return 500


def error_body(kind: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "field": field}}


OPENAI_PREFIX = "/v1/"


def openai_error_body(kind: str, message: str, field: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, for the /v1 routes: clients such as the `openai` package parse it."""
    kinds = {"invalid_request": "invalid_request_error", "overloaded": "rate_limit_error", "timeout": "timeout_error",
             "unavailable": "service_unavailable", "internal_error": "server_error",
             "unauthorized": "authentication_error", "payload_too_large": "invalid_request_error"}  # fmt: skip
    return {"error": {"message": message, "type": kinds.get(kind, kind), "param": field, "code": kind}}


def _respond(request: Request, kind: str, message: str, field: str | None, status: int,
             headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return error_response(request.url.path, kind, message, field, status, headers)


def error_response(path: str, kind: str, message: str, field: str | None, status: int,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    """The error in the shape the route's clients expect: OpenAI's on /v1, ours elsewhere."""
    if path.startswith(OPENAI_PREFIX):
        # OpenAI answers every invalid request with 400, and its clients expect that
        return JSONResponse(openai_error_body(kind, message, field), status_code=400 if status == 422 else status,
                            headers=headers)  # fmt: skip
    return JSONResponse(error_body(kind, message, field), status_code=status, headers=headers)


def engine_error_response(request: Request, error: EngineError) -> JSONResponse:
    headers = {}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    elif isinstance(error, EngineStopped):
        headers["Retry-After"] = "5"
    return _respond(request, error.kind, error.message, error.field, status_for(error), headers)


# Discriminated unions put the member's tag in an error's location (constraint.regex.pattern): a client
# wrote constraint.pattern.
_TAGGED_UNIONS = {"constraint"}


def _field(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    parts = [p for i, p in enumerate(parts) if i == 0 or parts[i - 1] not in _TAGGED_UNIONS]
    return ".".join(parts) or None


def _message(err: dict[str, Any]) -> str:
    field = _field_of(err)
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
    if kind == "extra_forbidden":
        return f"unknown field '{field}'"
    if kind == "missing":
        return f"'{field}' is required"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{field}: {msg}" if field else msg


def _field_of(err: dict[str, Any]) -> str | None:
    # A JSON syntax error's location is a character offset, not a field.
    return None if err.get("type") == "json_invalid" else _field(tuple(err.get("loc", ())))


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {"msg": "invalid request"}
    if request.url.path.startswith(OPENAI_PREFIX):
        return _respond(request, "invalid_request", _message(first), _field_of(first), 422)
    body = error_body("invalid_request", _message(first), _field_of(first))
    if len(errors) > 1:
        body["error"]["details"] = [
            {"field": _field_of(e), "message": _message(e)} for e in errors[:20]
        ]
    return JSONResponse(body, status_code=422)


async def _engine(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    return engine_error_response(request, exc)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kinds = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    return _respond(request, kinds.get(exc.status_code, "http_error"), str(exc.detail), None, exc.status_code,
                    getattr(exc, "headers", None))  # fmt: skip


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _respond(request, "internal_error", "internal server error", None, 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(EngineError, _engine)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
