"""Per-request state: everything the engine knows about one request lives in these two objects.

A RequestState owns its SequenceStates (one per returned sequence) and its output channel. The batch
only holds references to sequences; nothing here is kept in parallel lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from app.engine.constraints import Guide
from app.engine.detokenize import IncrementalText
from app.engine.kv_cache import Segment
from app.engine.scheduler import FINAL, Status
from app.engine.stopping import StreamText
from app.engine.types import Event, GenerationRequest, SamplingParams, ScoreRequest, TokenLogprob


class Channel:
    """Carries events from the engine thread to the request's asyncio task.

    Inside `collected()` (the engine's step) events wait in a list and cross to the event loop together at
    each `hand_off()`: one `call_soon_threadsafe` per loop for all of a decode step's tokens, not one per token
    (each wakes the loop through its self-pipe). Outside it (the engine stopping from another thread, a
    failure on the way out) an event is sent at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        pending: list[tuple[Channel, Event]] | None = getattr(_collecting, "pending", None)
        if pending is not None:
            pending.append((self, event))
        else:
            _send([(self, event)])


_collecting = threading.local()  # .pending: this thread's events not handed off yet, inside `collected()`


def _send(items: list[tuple[Channel, Event]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = {}
    for channel, event in items:  # in order: a channel's events keep theirs
        by_loop.setdefault(channel.loop, []).append((channel.queue, event))
    for loop, batch in by_loop.items():
        # The loop may be closed at shutdown; nobody is listening then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for queue, event in batch:
        queue.put_nowait(event)


def hand_off() -> None:
    """Send the events collected so far (a decode step's, or one prompt's first tokens: so a prompt prefilled
    early in a step does not wait for the step's other prefills)."""
    pending: list[tuple[Channel, Event]] | None = getattr(_collecting, "pending", None)
    if pending:
        _collecting.pending = []
        _send(pending)


@contextlib.contextmanager
def collected() -> Iterator[None]:
    """Collect this thread's events until `hand_off()` or the end of the block."""
    _collecting.pending = []
    try:
        yield
    finally:
        hand_off()
        _collecting.pending = None


@dataclass(eq=False)
class SequenceState:
    request: RequestState
    index: int
    params: SamplingParams
    generator: torch.Generator | None
    text: StreamText
    detok: IncrementalText  # the generated ids' text, decoded a few tokens per step
    tokens: list[int] = field(default_factory=list)  # generated ids
    kv_len: int = 0  # tokens of this row held in the KV cache
    segment: Segment | None = None  # its KV cache segment while it is in the batch
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when asked for
    logprobs_sent: int = 0  # how many of them went out with a TokenDelta
    last_token_at: float = 0.0  # monotonic time of the latest token, for inter-token latency
    # (V,) bool on the device, prompt + generated ids (sampling.seen_mask): only with a repetition penalty
    seen: torch.Tensor | None = None
    guide: Guide | None = None  # its grammar's matcher, when the request is constrained

    @property
    def wants_logprobs(self) -> int | None:
        return self.request.logprobs



@dataclass(eq=False)
class RequestState:
    id: str
    request: GenerationRequest | ScoreRequest
    prompt_ids: list[int]
    max_new_tokens: int  # 0 for scoring
    channel: Channel
    arrival: float
    deadline: float
    sequences: list[SequenceState] = field(default_factory=list)
    continuations: list[list[int]] = field(default_factory=list)  # scoring only
    admitted_at: float | None = None
    prefilled: int = 0  # prompt tokens whose K/V are computed (a long prompt: chunk by chunk)
    cancelled: bool = False  # set by the asyncio side when the client leaves; applied at the next step
    status: Status = Status.WAITING  # written by the scheduler alone

    # What a generation request asks beyond its tokens; a scoring request asks none of it.
    @property
    def logprobs(self) -> int | None:
        """Log-probabilities of each drawn token and this many alternatives (None: none)."""
        return self.request.logprobs if isinstance(self.request, GenerationRequest) else None

    @property
    def prompt_logprobs(self) -> int | None:
        """Log-probabilities of the prompt's own tokens (None: none): every position is computed, none reused."""
        return self.request.prompt_logprobs if isinstance(self.request, GenerationRequest) else None

    @property
    def ignore_eos(self) -> bool:
        return isinstance(self.request, GenerationRequest) and self.request.ignore_eos

    @property
    def chunkable(self) -> bool:
        """Its prompt may be computed a chunk per step: a generation that needs no prompt log-probabilities."""
        return not self.scoring and self.prompt_logprobs is None

    @property
    def done(self) -> bool:
        return self.status in FINAL

    @property
    def admitted(self) -> bool:
        """It holds KV budget for each of its sequences that has not finished."""
        return self.status in (Status.PREFILLING, Status.RUNNING)

    # Schedulable
    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def scoring(self) -> bool:
        return isinstance(self.request, ScoreRequest)

    @property
    def prefill_tokens(self) -> int:
        return sum(self.prompt_len + len(c) for c in self.continuations) if self.scoring else self.prompt_len

    @property
    def rows(self) -> int:
        # A scoring request never holds a batch row: it is done within its prefill step; so is a
        # request for the prompt's log-probabilities and no new tokens.
        if isinstance(self.request, ScoreRequest) or self.max_new_tokens == 0:
            return 0
        return self.request.num_return_sequences

    @property
    def kv_rows(self) -> int:
        """KV segments it holds: one per sequence; a scoring request, one while it is computed."""
        return 1 if self.scoring else self.rows

    @property
    def reserved_tokens(self) -> int:
        """KV tokens per segment: prompt + max new tokens (scoring: + the longest continuation)."""
        if self.scoring:
            return self.prompt_len + max((len(c) for c in self.continuations), default=0)
        return self.prompt_len + self.max_new_tokens

    def live_sequences(self) -> list[SequenceState]:
        return [s for s in self.sequences if s.finish_reason is None]
