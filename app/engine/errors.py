"""The engine's own error kinds. The HTTP edge maps each to one status code (app/api/errors.py)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: `message` is safe to show a client; `field` names the request field at fault."""

    kind = "engine_error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(EngineError):
    kind = "invalid_request"


class Overloaded(EngineError):
    kind = "overloaded"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(EngineError):
    kind = "timeout"


class EngineStopped(EngineError):
    kind = "unavailable"


class StepFailed(EngineError):
    """A model step raised for the rows this request was in; other requests go on."""

    kind = "internal_error"
