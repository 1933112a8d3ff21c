"""The output stage: a token drawn for a sequence becomes text and events, and a request ends one way.

`accept` appends a token: detokenizes the new part (app/engine/detokenize.py), matches stop strings across
token boundaries (app/engine/stopping.py), emits the text that can no longer be part of a stop, and joins
the sequence into the batch after its prefill or ends it. `end` is the one way a sequence ends (out of the
batch, its KV segment and budget back, its finish event); `retire` the one way a request does (finished,
failed or cancelled). Engine thread only; events go out through each request's Channel, handed to the event
loop a step at a time (app/engine/state.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from app.engine.errors import EngineError, StepFailed
from app.engine.limits import EngineStats
from app.engine.model_runner import ModelRunner
from app.engine.observer import EngineObserver
from app.engine.scheduler import Scheduler, Status
from app.engine.state import RequestState, SequenceState
from app.engine.types import PromptLogprobs, RequestFailed, RequestFinished, SequenceFinished, TokenDelta, TokenLogprob

T = TypeVar("T")
log = logging.getLogger(__name__)


class Output:
    def __init__(self, model_runner: ModelRunner, scheduler: Scheduler, stats: EngineStats, observer: EngineObserver,
                 eos_token_ids: frozenset[int]) -> None:  # fmt: skip
        self.model_runner = model_runner
        self.scheduler = scheduler
        self.stats = stats
        self.observer = observer
        self.eos_token_ids = eos_token_ids

    def begin(self, state: RequestState, tokens: list[int], first: list[TokenLogprob | None],
               scored: list[TokenLogprob] | None) -> int:  # fmt: skip
        """A prompt is computed into its segment (the scheduler has it running): emit its first tokens; its
        sequences join."""
        self.stats.prompt_tokens += state.prompt_len
        if scored is not None:
            state.channel.put(PromptLogprobs((None, *scored)))
        if not state.sequences:  # the prompt was all it asked about
            self.finish(state)
            return 0
        for seq, token, logprob in zip(state.sequences, tokens, first, strict=True):
            self.accept(seq, token, prefilled=True, logprob=logprob)
        return len(tokens)

    def contained(self, state: RequestState, work: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """One request's postprocessing (`work(*args, **kwargs)`): should it raise (a join that finds no room,
        a tokenizer error), that request fails and the loop, the batch and every other request go on."""
        try:
            return work(*args, **kwargs)
        except Exception as exc:
            log.exception("postprocessing failed for request %s", state.id)
            self.fail(state, StepFailed(f"postprocessing failed: {type(exc).__name__}"))
            return None

    def accept(self, seq: SequenceState, token: int, prefilled: bool = False,
                logprob: TokenLogprob | None = None) -> None:  # fmt: skip
        """Append one token to a sequence: detokenize, check stops, emit, and join or leave the batch.

        `prefilled`: the token is the first, drawn right after the request's prefill (the sequence joins).
        `logprob`: the token's log-probability, for a sequence that asked for them.
        """
        state = seq.request
        if state.done:
            return
        seq.tokens.append(token)
        arrived = time.monotonic()
        if len(seq.tokens) == 1:
            self.observer.first_token(arrived - state.arrival)
        else:
            self.observer.next_token(arrived - seq.last_token_at)
        seq.last_token_at = arrived
        if seq.seen is not None:
            seq.seen[token] = True  # for the repetition penalty of the next draw
        if logprob is not None:
            seq.logprobs.append(logprob)
        self.stats.generated_tokens += 1
        finish = None
        if token in self.eos_token_ids and not state.ignore_eos:
            finish = "eos"
        elif seq.guide is not None and (not seq.guide.accept(token) or seq.guide.complete):
            finish = "stop"  # the grammar is complete (or, never under its mask, broken)
        elif len(seq.tokens) >= state.max_new_tokens:
            finish = "length"
        decoded = seq.detok.update(seq.tokens, final=finish is not None)
        if seq.text.feed(decoded):
            finish = "stop"  # a stop string on the last token counts as the stop, not eos or length
        delta = seq.text.release(final=finish is not None)
        if delta:
            state.channel.put(TokenDelta(seq.index, delta, token, tuple(seq.logprobs[seq.logprobs_sent :])))
            seq.logprobs_sent = len(seq.logprobs)
        if finish is None:
            if prefilled:
                self.model_runner.join(seq)
            return
        self.end(seq, finish)
        if not state.live_sequences():
            self.retire(state, Status.FINISHED)

    # ---- retirement: the one way out ------------------------------------------------------------
    def end(self, seq: SequenceState, reason: str, announce: bool = True) -> None:
        """The one way a sequence ends: out of the batch (its KV segment back), its KV budget released, and its
        finish event, unless its request is failing or cancelled (`announce=False`)."""
        state = seq.request
        if seq.segment is not None:
            self.model_runner.leave(seq)
        if state.admitted:
            self.scheduler.release(state)
        seq.finish_reason = reason
        if announce:
            complete = None if seq.guide is None else reason in ("stop", "eos") and seq.guide.accepting
            state.channel.put(SequenceFinished(seq.index, reason, seq.text.text, tuple(seq.tokens), seq.params.seed,
                                               tuple(seq.logprobs), complete))  # fmt: skip

    def retire(self, state: RequestState, status: Status, error: EngineError | None = None) -> None:
        """The one way a request ends, finished, failed or cancelled: its unfinished sequences end ("aborted"), a
        prompt that never joined frees its segment, the scheduler marks it ended, and its last event goes out."""
        if state.done:
            return
        for seq in state.live_sequences():
            self.end(seq, "aborted", announce=False)
        self.model_runner.discard(state)
        self.scheduler.retire(state, status)
        if status is Status.FINISHED:
            self.stats.completed_requests += 1
            now = time.monotonic()
            finished = RequestFinished(
                prompt_tokens=state.prompt_len,
                completion_tokens=sum(len(s.tokens) for s in state.sequences),
                queue_seconds=(state.admitted_at or now) - state.arrival,
                total_seconds=now - state.arrival,
            )
            self.observer.finished(finished.prompt_tokens, finished.completion_tokens, finished.queue_seconds)
            state.channel.put(finished)
        elif status is Status.FAILED:
            self.stats.failed_requests += 1
            state.channel.put(RequestFailed(error or StepFailed("the request failed")))

    def finish(self, state: RequestState) -> None:
        self.retire(state, Status.FINISHED)

    def fail(self, state: RequestState, error: EngineError) -> None:
        self.retire(state, Status.FAILED, error)

    def close(self, state: RequestState) -> None:
        """The client went away: free everything, tell no one."""
        self.retire(state, Status.CANCELLED)
