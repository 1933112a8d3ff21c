"""Per-request state: everything the engine knows about one request lives in these two objects.

A RequestState owns its SequenceStates (one per returned sequence) and its output channel. The batch
only holds references to sequences; nothing here is kept in parallel lists.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import torch

from app.engine.detokenize import IncrementalText
from app.engine.kv_cache import Segment
from app.engine.stopping import StreamText
from app.engine.types import Event, GenerationRequest, SamplingParams, ScoreRequest, TokenLogprob


class Channel:
    """Carries events from the engine thread to the request's asyncio task."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        # The loop may be closed at shutdown; nobody is listening then.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


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

    @property
    def wants_logprobs(self) -> int | None:
        return getattr(self.request.request, "logprobs", None)

    @property
    def history(self) -> list[int]:
        return self.request.prompt_ids + self.tokens


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
    cancelled: bool = False
    done: bool = False

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
    def reserved_tokens(self) -> int:
        return self.prompt_len + self.max_new_tokens

    def live_sequences(self) -> list[SequenceState]:
        return [s for s in self.sequences if s.finish_reason is None]
