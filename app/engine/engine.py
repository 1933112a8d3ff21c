"""The engine: one thread runs schedule -> step -> postprocess; the asyncio side only submits and reads.

`submit` has the input stage (app/engine/input.py) validate and tokenize the request on its own thread,
then queues it; the caller iterates the returned RequestStream (app/engine/stream.py). Continuous
batching: every step decodes one token for each running row, then prefills newly admitted requests,
whose rows join the batch for the next step. Finished rows leave at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import torch

from app.engine.batch import Batch
from app.engine.errors import (
    EngineError,
    EngineStopped,
    RequestTimeout,
    StepFailed,
)
from app.engine.input import Input
from app.engine.kv_cache import BLOCK
from app.engine.limits import EngineLimits, EngineStats
from app.engine.logprobs import token_logprobs
from app.engine.memory import TRIM_INTERVAL_S, release_free_memory
from app.engine.observer import EngineObserver, NullObserver
from app.engine.prefix_cache import PrefixCache
from app.engine.sampling import SampleRow, sample
from app.engine.scheduler import Scheduler
from app.engine.state import RequestState, SequenceState
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
    TokenLogprob,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

class Engine:
    def __init__(self, model: Any, tokenizer: Any, limits: EngineLimits, *, context_length: int,
                 eos_token_ids: tuple[int, ...], observer: EngineObserver | None = None,
                 threads: int | None = None) -> None:  # fmt: skip
        self.model = model
        # torch intra-op threads for the engine's thread (None: torch's setting as it is); see `start`
        self.threads = threads
        self.observer: EngineObserver = observer or NullObserver()
        self.tokenizer = tokenizer
        self.limits = limits
        self.context_length = context_length
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = next(model.parameters()).device
        # new requests are validated and tokenized on the input stage's thread, off the event loop
        self.input = Input(tokenizer, limits, context_length=context_length,
                           vocab_size=int(model.config.vocab_size), device=self.device)  # fmt: skip
        self.max_prompt_tokens = self.input.max_prompt_tokens
        self.scheduler = Scheduler(
            limits.max_batch_size, limits.max_batch_tokens, limits.max_prefill_tokens, limits.max_queued_requests,
            limits.max_queued_tokens, kv_block=BLOCK,
        )  # fmt: skip
        self.batch = Batch(model, limits.max_batch_size, limits.max_batch_tokens)
        # admitted prompts longer than a chunk, prefilled one chunk per step, first in first out
        self.prefilling: deque[RequestState] = deque()
        self.prefix_cache = PrefixCache(limits.prefix_cache_bytes)
        self.running: dict[str, RequestState] = {}  # admitted, not finished; engine thread only
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._allocated = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()
        self._tokens_per_s = 0.0  # smoothed decode throughput, for Retry-After
        self.fatal: BaseException | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine's thread and wait until its buffers are allocated.

        With `threads`, the model's multi-threaded work runs on the engine's thread only: the caller's thread
        is set to one torch thread, so it never starts a pool of OpenMP workers of its own (two live pools
        on a machine with as many cores as one of them stop spin-waiting, which made a one-row decode step
        38 ms instead of 26: app/models/loader.py)."""
        if self._thread is not None:
            return
        if self.threads is not None:
            torch.set_num_threads(1)
        self._thread = threading.Thread(target=self._loop, name="textgen-engine", daemon=True)
        self._thread.start()
        self._allocated.wait()
        if self.fatal is not None:
            raise RuntimeError("the engine could not start") from self.fatal

    def _allocate(self) -> None:
        # The KV arena and the prefix cache's pool are allocated before any request: zero-filling hundreds of
        # MB inside the first prefill would count against that request's timeout.
        example = self.batch.kv_example()
        self.batch.allocate(example)
        self.prefix_cache.reserve(example)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; every request still queued or running fails with EngineStopped.

        Only the engine's thread touches the batch: it fails what is left as it leaves its loop. If it is
        still inside a step after `timeout`, the requests are told from here, and the batch is left alone."""
        self._stop.set()
        self._wake.set()
        self.input.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                return
            log.warning("the engine is still inside a step after %.0fs; stopping without it", timeout)
        for state in self._all_requests():
            if not state.done:
                state.done = True  # the engine's thread, should it come back, sends nothing more
                state.channel.put(RequestFailed(EngineStopped("the server is shutting down")))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    # ---- submission (event-loop thread) -------------------------------------------------------
    async def submit(self, request: GenerationRequest | ScoreRequest) -> RequestStream:
        """Validate and tokenize `request` on the input stage's thread, then queue it; raises InvalidRequest,
        Overloaded or EngineStopped."""
        if not self.is_running:
            raise EngineStopped("the engine is not running")
        state = await self.input.run(self.input.prepare, request, asyncio.get_running_loop())
        if not self.is_running:
            raise EngineStopped("the engine is not running")
        return self._enqueue(state)

    async def on_input(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` on the input stage's thread: the tokenizing work of routes (prompt templates, /tokenize)."""
        return await self.input.run(work, *args)

    def _enqueue(self, state: RequestState) -> RequestStream:
        stream = RequestStream(state, self.abort)  # the channel exists before the engine can see the request
        self.scheduler.add(state, retry_after=self._retry_after())
        self._wake.set()
        return stream

    def _all_requests(self) -> list[RequestState]:
        waiting = [s for s in list(self.scheduler.waiting) if isinstance(s, RequestState)]
        return list(self.running.values()) + waiting

    def abort(self, state: RequestState) -> None:
        """Thread-safe: the engine frees the request's rows at its next step."""
        state.cancelled = True
        self._wake.set()

    def _retry_after(self) -> float:
        queued = self.scheduler.queued_tokens()
        rate = self._tokens_per_s or 50.0
        return float(max(1, math.ceil(queued / rate)))

    # ---- the loop (engine thread) -------------------------------------------------------------
    def _loop(self) -> None:
        try:
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            with torch.inference_mode():  # the cache's buffers are made and written only in here
                self._allocate()
                self._allocated.set()
                self._run_until_stopped()
                for state in self._all_requests():  # stopped: what is left fails here, on this thread
                    self._fail(state, EngineStopped("the server is shutting down"))
                self.batch.clear()  # rows of requests `stop` told while this thread was still in a step
        except BaseException as exc:  # the loop must never die silently
            log.exception("engine loop died")
            self.fatal = exc
            self._allocated.set()
            self._stop.set()
            for state in self._all_requests():
                self._fail(state, EngineStopped("the engine stopped after an internal error"))

    def _run_until_stopped(self) -> None:
        busy = False
        trimmed = time.monotonic()
        while not self._stop.is_set():
            if not self.running and not self.scheduler.queued:
                if busy:  # just went idle: hand what the burst freed back to the OS
                    release_free_memory()
                    busy = False
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            busy = True
            self.step()
            if time.monotonic() - trimmed > TRIM_INTERVAL_S:
                # under steady load too: freed blocks of every size would otherwise stay resident
                release_free_memory()
                trimmed = time.monotonic()

    def step(self) -> None:
        """schedule -> run -> postprocess."""
        now = time.monotonic()
        self._drop_cancelled_and_late(now)
        # a chunk of a long prompt runs this step: newcomers' prompts get what is left of the prefill budget
        chunk = self.limits.prefill_chunk_tokens if self.prefilling else 0
        budget = max(0, self.limits.max_prefill_tokens - chunk)
        plan = self.scheduler.schedule(now, prefill_budget=budget, defer_longer_than=chunk or None)
        for state in plan.expired:
            self._fail(state, RequestTimeout(f"request waited {now - state.arrival:.1f}s in the queue; "
                                             f"its timeout is {self.input.timeout(state.request):g}s"))
        for state in plan.cancelled:
            self._close(state)
        started = time.perf_counter()
        rows = len(self.batch.seqs)
        produced = self._decode_running() + self._prefill_chunk() + self._prefill(plan.admitted, now)
        elapsed = time.perf_counter() - started
        if rows or plan.admitted:
            self.observer.step(rows, elapsed)
        self._stats.busy_seconds += elapsed
        if produced:
            rate = produced / max(elapsed, 1e-6)
            self._tokens_per_s = rate if not self._tokens_per_s else 0.9 * self._tokens_per_s + 0.1 * rate
        self._stats.steps += 1

    def _decode_running(self) -> int:
        if not self.batch.seqs:
            return 0
        seqs = list(self.batch.seqs)
        self._stats.batch_sizes[len(seqs)] += 1
        started = time.perf_counter()
        try:
            logits = self.batch.decode()  # (B, V)
            scored = self._logprobs(seqs, logits)
            tokens = sample(logits, [SampleRow(s.params, s.generator, s.history) for s in seqs])
            self._stats.decode_seconds += time.perf_counter() - started
        except Exception as exc:
            log.exception("decode step failed for %d rows", len(seqs))
            for seq in self.batch.clear():
                self._fail(seq.request, StepFailed(f"the model step failed: {type(exc).__name__}"))
            return 0
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            self._contained(seq.request, self._accept, seq, token, logprobs=scored.get(i))
        return len(seqs)

    @staticmethod
    def _logprobs(seqs: list[SequenceState], logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """The raw logits rows (V,), copied out of the step's, of the rows (positions in `seqs`) that asked for
        log-probabilities; `token_logprobs` normalizes them, once."""
        wanted = [i for i, s in enumerate(seqs) if s.wants_logprobs is not None]
        if not wanted:
            return {}
        rows = logits[wanted].float()  # (W, V)
        return dict(zip(wanted, rows, strict=True))

    def _prefill(self, admitted: list[RequestState], now: float) -> int:
        produced = 0
        # Admission is FIFO; within a step, shortest prompt first: each request's first token is sent
        # as soon as its own prefill ends, so this ordering minimises the step's mean time to first token.
        for state in sorted(admitted, key=lambda s: s.prefill_tokens):
            if state.scoring:
                produced += self._score(state, now)
                continue
            wants_prompt = getattr(state.request, "prompt_logprobs", None) is not None
            state.admitted_at = now
            if state.prompt_len > self.limits.prefill_chunk_tokens and not wants_prompt:
                # prefilled a chunk per step from the next step on, while the batch keeps decoding
                self.running[state.id] = state
                self.prefilling.append(state)
                continue
            started = time.perf_counter()
            try:
                # prompt log-probabilities need every prompt position computed: no reuse then
                hit = None if wants_prompt else self.prefix_cache.match(state.prompt_ids)
                logits, kv, scored = self.batch.prefill(state, hit)  # (V,)
                self.prefix_cache.store(state.prompt_ids, kv)
                tokens, first = self._first_tokens(state, logits)
                self._stats.prefill_seconds += time.perf_counter() - started
            except Exception as exc:
                log.exception("prefill failed for request %s", state.id)
                self.scheduler.release(state, state.rows)  # reserved at admission, never ran
                self._fail(state, StepFailed(f"the model step failed: {type(exc).__name__}"))
                continue
            self.running[state.id] = state
            produced += self._contained(state, self._begin, state, tokens, first, scored) or 0
        self.batch.settle()
        return produced

    def _prefill_chunk(self) -> int:
        """The next chunk of the oldest long prompt being prefilled; when it was the last, the prompt joins."""
        while self.prefilling and self.prefilling[0].done:  # cancelled or timed out meanwhile
            self.prefilling.popleft()
        if not self.prefilling:
            return 0
        state = self.prefilling[0]
        started = time.perf_counter()
        try:
            hit = self.prefix_cache.match(state.prompt_ids) if state.prefilled == 0 else None
            start = hit.length if hit is not None else state.prefilled
            stop = min(state.prompt_len, start + self.limits.prefill_chunk_tokens)
            logits = self.batch.prefill_chunk(state, stop, hit)  # (V,)
            if stop < state.prompt_len:
                self._stats.prefill_seconds += time.perf_counter() - started
                return 0
            self.prefilling.popleft()
            self.prefix_cache.store(state.prompt_ids, self.batch.prompt_kv(state))
            tokens, first = self._first_tokens(state, logits)
            self._stats.prefill_seconds += time.perf_counter() - started
        except Exception as exc:
            log.exception("prefill failed for request %s", state.id)
            if self.prefilling and self.prefilling[0] is state:
                self.prefilling.popleft()
            self._fail(state, StepFailed(f"the model step failed: {type(exc).__name__}"))  # frees its reservation
            return 0
        return self._contained(state, self._begin, state, tokens, first, None) or 0

    def _first_tokens(self, state: RequestState, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """Each sequence's first token, drawn from the prompt's last logits (V,), and those logits (V,) when the
        request asked for log-probabilities."""
        rows = [SampleRow(s.params, s.generator, s.history) for s in state.sequences]
        tokens = sample(logits.unsqueeze(0).expand(len(rows), -1), rows) if rows else []
        first = self._logprobs(state.sequences[:1], logits.unsqueeze(0)).get(0)  # (V,), same for all rows
        return tokens, first

    def _begin(self, state: RequestState, tokens: list[int], first: torch.Tensor | None,
               scored: list[TokenLogprob] | None) -> int:  # fmt: skip
        """A prompt is computed into its segment: emit its first tokens; its sequences join."""
        self._stats.prompt_tokens += state.prompt_len
        if scored is not None:
            state.channel.put(PromptLogprobs((None, *scored)))
        if not state.sequences:  # the prompt was all it asked about
            self._finish(state)
            return 0
        for seq, token in zip(state.sequences, tokens, strict=True):
            self._accept(seq, token, prefilled=True, logprobs=first)
        return len(tokens)

    def _score(self, state: RequestState, now: float) -> int:
        started = time.perf_counter()
        try:
            reused, prefix = self.prefix_cache.lookup(state.prompt_ids)
            logprobs, kv = self.batch.score(state.prompt_ids, state.continuations, reused, prefix)
            self.prefix_cache.store(state.prompt_ids, kv)
        except Exception as exc:
            log.exception("scoring failed for request %s", state.id)
            self._fail(state, StepFailed(f"the model step failed: {type(exc).__name__}"))
            return 0
        self._stats.prefill_seconds += time.perf_counter() - started
        self._stats.prompt_tokens += state.prefill_tokens
        state.admitted_at = now
        state.channel.put(Scores(tuple(logprobs), tuple(len(c) for c in state.continuations)))
        self._finish(state)
        return 0

    # ---- postprocess --------------------------------------------------------------------------
    def _contained(self, state: RequestState, work: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """One request's postprocessing (`work(*args, **kwargs)`): should it raise (a join that finds no room,
        a tokenizer error), that request fails and the loop, the batch and every other request go on."""
        try:
            return work(*args, **kwargs)
        except Exception as exc:
            log.exception("postprocessing failed for request %s", state.id)
            self._fail(state, StepFailed(f"postprocessing failed: {type(exc).__name__}"))
            return None

    def _accept(self, seq: SequenceState, token: int, prefilled: bool = False,
                logprobs: torch.Tensor | None = None) -> None:  # fmt: skip
        """Append one token to a sequence: detokenize, check stops, emit, and join or leave the batch.

        `prefilled`: the token is the first, drawn right after the request's prefill (the sequence joins).
        `logprobs`: the raw logits (V,) the token was drawn from, for a sequence that asked for log-probabilities.
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
        if logprobs is not None and seq.wants_logprobs is not None:
            seq.logprobs.append(token_logprobs(logprobs.unsqueeze(0), [token], seq.wants_logprobs)[0])
        self._stats.generated_tokens += 1
        finish = None
        if token in self.eos_token_ids and not getattr(state.request, "ignore_eos", False):
            finish = "eos"
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
                self.batch.join(seq)
            return
        seq.finish_reason = finish
        if seq.segment is not None:
            self.batch.leave(seq)
            self.scheduler.release(state)
        elif prefilled:
            self.scheduler.release(state)  # finished on its first token: never joined
        state.channel.put(SequenceFinished(seq.index, finish, seq.text.text, tuple(seq.tokens), seq.params.seed,
                                           tuple(seq.logprobs)))  # fmt: skip
        if not state.live_sequences():
            self._finish(state)

    def _finish(self, state: RequestState) -> None:
        state.done = True
        self.running.pop(state.id, None)
        self._stats.completed_requests += 1
        now = time.monotonic()
        finished = RequestFinished(
            prompt_tokens=state.prompt_len,
            completion_tokens=sum(len(s.tokens) for s in state.sequences),
            queue_seconds=(state.admitted_at or now) - state.arrival,
            total_seconds=now - state.arrival,
        )
        self.observer.finished(finished.prompt_tokens, finished.completion_tokens, finished.queue_seconds)
        state.channel.put(finished)

    def _release_rows(self, state: RequestState) -> None:
        self.batch.discard(state)  # a prompt computed (or being computed) that will not join
        for seq in state.sequences:
            if seq.segment is not None:
                self.batch.leave(seq)
            if state.id in self.running and seq.finish_reason is None:
                self.scheduler.release(state)
                seq.finish_reason = "aborted"

    def _fail(self, state: RequestState, error: EngineError) -> None:
        if state.done:
            return
        self._release_rows(state)
        state.done = True
        self.running.pop(state.id, None)
        self._stats.failed_requests += 1
        state.channel.put(RequestFailed(error))

    def _close(self, state: RequestState) -> None:
        """The client went away: free everything, tell no one."""
        self._release_rows(state)
        state.done = True
        self.running.pop(state.id, None)

    def _drop_cancelled_and_late(self, now: float) -> None:
        for state in list(self.running.values()):
            if state.cancelled:
                self._close(state)
            elif now > state.deadline:
                self._fail(state, RequestTimeout(
                    f"request ran past its timeout of {self.input.timeout(state.request):g}s"))  # fmt: skip

    # ---- introspection ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self._stats
        return replace(
            s,
            running_requests=len(self.running),
            running_rows=len(self.batch.seqs),
            waiting=self.scheduler.queued,
            kv_cache_bytes=self.batch.cache.nbytes(),
            kv_cache_capacity_bytes=self.batch.cache.capacity_bytes(),
            prefix_cache_bytes=self.prefix_cache.nbytes,
            prefix_cache_entries=len(self.prefix_cache),
            prefix_hit_tokens=self.prefix_cache.hit_tokens,
            batch_sizes=Counter(s.batch_sizes),
        )
