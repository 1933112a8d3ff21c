"""Reading a request's engine events at the HTTP edge: collect them all, or relay them as SSE.

Both paths abort the engine request when the client goes away, so its batch row is freed at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi.sse import format_sse_event
from starlette.types import Receive

from app.api.access import note_finished
from app.engine.engine import Engine
from app.engine.stream import RequestStream
from app.engine.types import (
    GenerationRequest,
    PromptLogprobs,
    RequestFailed,
    RequestFinished,
    ScoreRequest,
    Scores,
    SequenceFinished,
    TokenDelta,
)


@dataclass
class Collected:
    sequences: dict[int, SequenceFinished] = field(default_factory=dict)
    scores: Scores | None = None
    prompt_logprobs: PromptLogprobs | None = None
    finished: RequestFinished | None = None


async def submit_all(engine: Engine, requests: Sequence[GenerationRequest | ScoreRequest]) -> list[RequestStream]:
    """Submit every request or none: if one is refused (429, 422), the ones already queued are aborted."""
    streams: list[RequestStream] = []
    try:
        for r in requests:
            streams.append(await engine.submit(r))
    except Exception:
        for s in streams:
            s.abort()
        raise
    return streams


async def _drain(stream: RequestStream) -> Collected:
    result = Collected()
    async for event in stream:
        if isinstance(event, SequenceFinished):
            result.sequences[event.index] = event
        elif isinstance(event, Scores):
            result.scores = event
        elif isinstance(event, PromptLogprobs):
            result.prompt_logprobs = event
        elif isinstance(event, RequestFinished):
            result.finished = event
            note_finished(event)
        elif isinstance(event, RequestFailed):
            raise event.error
    return result


async def _client_gone(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def collect(receive: Receive, streams: list[RequestStream]) -> list[Collected] | None:
    """All results of the requests one HTTP call made, or None if the client disconnected first.

    Whatever ends it early (a disconnect, one request's error) aborts every request still running.
    """
    drains = [asyncio.ensure_future(_drain(s)) for s in streams]
    work: asyncio.Future[list[Collected]] = asyncio.gather(*drains)
    gone: asyncio.Future[None] = asyncio.ensure_future(_client_gone(receive))
    waiting: set[asyncio.Future[Any]] = {work, gone}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for drain in drains:
            drain.cancel()  # no-op for finished ones; one failure must not leave the others waiting
        for stream in streams:
            stream.abort()
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
    if not work.done() or work.cancelled():
        return None
    return list(work.result())


def sse(payload: dict[str, Any] | str) -> bytes:
    """One SSE frame: a JSON object, or a literal (OpenAI's closing `[DONE]`)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return format_sse_event(data_str=data)


async def sse_events(
    stream: RequestStream,
    on_delta: Callable[[TokenDelta], dict[str, Any] | None],
    on_done: Callable[[Collected], list[dict[str, Any] | str]],
    on_error: Callable[[Exception], dict[str, Any] | list[dict[str, Any] | str]],
    on_prompt: Callable[[PromptLogprobs | None], dict[str, Any] | None] | None = None,
) -> AsyncIterator[bytes]:
    """Relay engine events as SSE frames. When the client disconnects, Starlette cancels this
    generator, and `finally` aborts the engine request.

    `on_prompt` makes the first frame (an echo of the prompt): from the prompt's log-probabilities
    when the request asked for them, else (None) before anything else arrives.
    """
    result = Collected()
    try:
        if on_prompt is not None and not stream.wants_prompt_logprobs:
            first = on_prompt(None)
            if first is not None:
                yield sse(first)
        async for event in stream:
            if isinstance(event, PromptLogprobs):
                if on_prompt is not None:
                    first = on_prompt(event)
                    if first is not None:
                        yield sse(first)
            elif isinstance(event, TokenDelta):
                delta = on_delta(event)
                if delta is not None:
                    yield sse(delta)
            elif isinstance(event, SequenceFinished):
                result.sequences[event.index] = event
            elif isinstance(event, RequestFinished):
                result.finished = event
                note_finished(event)
                for payload in on_done(result):
                    yield sse(payload)
            elif isinstance(event, RequestFailed):
                failure = on_error(event.error)
                for payload in failure if isinstance(failure, list) else [failure]:
                    yield sse(payload)
    finally:
        stream.abort()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
