"""Checks every request passes before a route sees it: body size, API key, and not shutting down.

Pure ASGI middleware, so an oversized body is refused before it is read into memory, and a
refused request never reaches validation or the engine.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response


class BodyLimit:
    """413 for a body over `limit` bytes, whether it declares its length or streams it in chunks.

    The rest of an oversized body is read and dropped (up to DRAIN_FACTOR times the limit) before the
    413 goes out, so the client, still sending, reads the answer instead of a reset connection; past
    that the connection is closed.
    """

    DRAIN_FACTOR = 16

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, size=0, more=True)
            return
        # Read the body here (at most `limit` bytes), then hand it on: the app reads it from memory.
        chunks: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, receive, send, size, message.get("more_body", False))
                return
            chunks.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int, more: bool) -> None:
        while more and size <= self.DRAIN_FACTOR * self.limit:
            chunk = await receive()
            if chunk["type"] != "http.request":
                return  # the client left: nobody to answer
            size += len(chunk.get("body", b""))
            more = chunk.get("more_body", False)
        message = f"request body is larger than this server's limit of {self.limit} bytes"
        headers = {"Connection": "close"} if more else None
        response = error_response(scope["path"], "payload_too_large", message, None, 413, headers)
        await response(scope, receive, send)


class ApiKeys:
    """With keys configured, every path except the open ones needs `Authorization: Bearer KEY` or
    `X-API-Key: KEY`. Keys are compared in constant time, each of them, so timing tells nothing."""

    def __init__(self, app: ASGIApp, keys: list[str], open_paths: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        # "/static/" (ending in a slash) opens everything under it; other entries are exact paths
        self.open_paths = {p for p in open_paths if p == "/" or not p.endswith("/")}
        self.open_prefixes = tuple(p for p in open_paths if p != "/" and p.endswith("/"))

    def _allowed(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if not given:
            return False
        match = False
        for key in self.keys:
            match |= hmac.compare_digest(given, key)
        return match

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or not self.keys or path in self.open_paths or path.startswith(self.open_prefixes)
                or scope["method"] == "OPTIONS" or self._allowed(scope)):  # fmt: skip
            await self.app(scope, receive, send)
            return
        response = error_response(
            scope["path"], "unauthorized",
            "a valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            None, 401, {"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
        await response(scope, receive, send)


class Draining:
    """After SIGTERM (`state.draining` set): new requests get 503 with Retry-After; those already
    inside finish. Liveness stays up, readiness goes down (it checks `draining` itself)."""

    def __init__(self, app: ASGIApp, state: Any, open_paths: tuple[str, ...] = ("/health", "/ready", "/metrics")):
        self.app = app
        self.state = state
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and getattr(self.state, "draining", False) and scope["path"] not in self.open_paths:
            response = error_response(scope["path"], "unavailable", "the server is shutting down; retry elsewhere",
                                      None, 503, {"Retry-After": "5", "Connection": "close"})  # fmt: skip
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
