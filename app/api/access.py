"""Per-request bookkeeping at the outermost edge: request id, one structured log line, HTTP metrics,
and the `X-Request-ID` / `X-Textgen-Model` response headers.

Handlers deep inside (the readers of engine events) add token counts and queue time to the current
request's record through a context variable, so no route has to pass them back up.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.engine.types import RequestFinished
from app.metrics import Metrics

log = logging.getLogger("textgen.access")

# A client's own id is kept when it is short and plain (it ends up in logs and headers).
CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass
class RequestRecord:
    id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float = 0.0


current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("textgen_request", default=None)


def note_finished(finished: RequestFinished) -> None:
    """Add one engine request's usage to the HTTP request's record (an HTTP call may make several)."""
    record = current.get()
    if record is not None:
        record.prompt_tokens += finished.prompt_tokens
        record.completion_tokens += finished.completion_tokens
        record.queue_seconds = max(record.queue_seconds, finished.queue_seconds)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if CLIENT_ID.fullmatch(text):
                return str(text)
    return uuid.uuid4().hex


class AccessMiddleware:
    def __init__(self, app: ASGIApp, state: Any, metrics: Metrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state: the model's name appears there once loaded
        self.metrics = metrics
        self.routes = routes  # to name the route of a request refused before routing (401, 413, 503)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = RequestRecord(_request_id(scope))
        token = current.set(record)
        status = 500
        info = getattr(self.state, "model_info", None)
        extra = [(b"x-request-id", record.id.encode())]
        if info is not None:
            extra.append((b"x-textgen-model", info.name.encode()))

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            current.reset(token)
            self._done(scope, record, status, time.perf_counter() - started)

    def _done(self, scope: Scope, record: RequestRecord, status: int, seconds: float) -> None:
        route = scope.get("route") or next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        path = getattr(route, "path", None) or "unmatched"  # templates only: bounded label values
        self.metrics.http(path, scope["method"], status, seconds)
        log.info(json.dumps({
            "request_id": record.id, "method": scope["method"], "route": path, "path": scope["path"],
            "status": status, "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
            "queue_s": round(record.queue_seconds, 4), "total_s": round(seconds, 4),
        }))  # fmt: skip
