"""Reading a request's engine events at the HTTP edge: collect them all, or relay them as SSE.

Both paths abort the engine request when the client goes away, so its batch row is freed at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.sse import format_sse_event
from starlette.types import Receive

from app.engine.engine import RequestStream
from app.engine.types import RequestFailed, RequestFinished, SequenceFinished, TokenDelta


@dataclass
class Collected:
    sequences: dict[int, SequenceFinished] = field(default_factory=dict)
    finished: RequestFinished | None = None


async def _drain(stream: RequestStream) -> Collected:
    result = Collected()
    async for event in stream:
        if isinstance(event, SequenceFinished):
            result.sequences[event.index] = event
        elif isinstance(event, RequestFinished):
            result.finished = event
        elif isinstance(event, RequestFailed):
            raise event.error
    return result


async def _client_gone(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def collect(receive: Receive, stream: RequestStream) -> Collected | None:
    """All of a request's results, or None if the client disconnected first (the request is aborted)."""
    work = asyncio.ensure_future(_drain(stream))
    gone = asyncio.ensure_future(_client_gone(receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            stream.abort()
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
    if work.cancelled():
        return None
    return work.result()


def sse(payload: dict[str, Any]) -> bytes:
    return format_sse_event(data_str=json.dumps(payload, ensure_ascii=False))


async def sse_events(
    stream: RequestStream,
    on_delta: Callable[[TokenDelta], dict[str, Any] | None],
    on_done: Callable[[Collected], list[dict[str, Any]]],
    on_error: Callable[[Exception], dict[str, Any]],
) -> AsyncIterator[bytes]:
    """Relay engine events as SSE frames. When the client disconnects, Starlette cancels this
    generator, and `finally` aborts the engine request."""
    result = Collected()
    try:
        async for event in stream:
            if isinstance(event, TokenDelta):
                payload = on_delta(event)
                if payload is not None:
                    yield sse(payload)
            elif isinstance(event, SequenceFinished):
                result.sequences[event.index] = event
            elif isinstance(event, RequestFinished):
                result.finished = event
                for payload in on_done(result):
                    yield sse(payload)
            elif isinstance(event, RequestFailed):
                yield sse(on_error(event.error))
    finally:
        stream.abort()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
