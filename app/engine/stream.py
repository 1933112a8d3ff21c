"""A request's events as the asyncio side reads them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from app.engine.state import RequestState
from app.engine.types import Event, RequestFailed, RequestFinished


class RequestStream:
    """Async iterator over one request's events. Closing it early aborts the request."""

    def __init__(self, state: RequestState, abort: Callable[[RequestState], None]) -> None:
        self._state = state
        self._abort = abort  # thread-safe: the engine frees the request's rows at its next step
        self._finished = False

    @property
    def prompt_ids(self) -> list[int]:
        return self._state.prompt_ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self._state.prompt_logprobs is not None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._finished:
            raise StopAsyncIteration
        event = await self._state.channel.queue.get()
        if isinstance(event, RequestFinished | RequestFailed):
            self._finished = True
        return event

    def abort(self) -> None:
        if not self._finished:
            self._finished = True
            self._abort(self._state)

    async def aclose(self) -> None:
        self.abort()
