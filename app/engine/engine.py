"""The engine: one thread runs schedule -> run -> postprocess; the asyncio side only submits and reads.

The request path, one module each: `submit` has the input stage (app/engine/input.py) validate and tokenize
the request on its own thread, then queues it in the scheduler (scheduler.py: the owner of every request's
status and of the waiting / prefilling / running containers; admission by rows and KV tokens); each step
applies cancellations and timeouts at one point, then the step executor (executor.py) has the model runner
(model_runner.py, over the ragged KV cache of kv_cache.py) decode one token for every row of the batch, compute
a chunk of a long prompt and the newly admitted prompts; the sampler (sampling.py) draws the tokens and the
output stage (output.py) turns them into text and events, and retires what ends. The step's events reach the caller's
RequestStream (stream.py) together. Continuous batching: a prompt's sequences join the batch for the next
step; finished rows leave at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import torch

from app.engine.constraints import Grammars
from app.engine.errors import (
    EngineStopped,
    RequestTimeout,
)
from app.engine.executor import StepExecutor
from app.engine.input import Input
from app.engine.kv_cache import BLOCK
from app.engine.limits import EngineLimits, EngineStats
from app.engine.memory import TRIM_INTERVAL_S, device_memory, release_free_memory
from app.engine.model_runner import ModelRunner
from app.engine.observer import EngineObserver, NullObserver
from app.engine.output import Output
from app.engine.prefix_cache import PrefixCache
from app.engine.scheduler import Scheduler
from app.engine.state import RequestState, collected
from app.engine.stream import RequestStream
from app.engine.types import (
    GenerationRequest,
    RequestFailed,
    ScoreRequest,
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
        self.device = next(model.parameters()).device
        # new requests are validated and tokenized on the input stage's thread, off the event loop
        self.grammars = Grammars(tokenizer, int(model.config.vocab_size), eos_token_ids)  # constrained output
        self.input = Input(tokenizer, limits, context_length=context_length,
                           vocab_size=int(model.config.vocab_size), device=self.device,
                           grammars=self.grammars)  # fmt: skip
        self.max_prompt_tokens = self.input.max_prompt_tokens
        self.scheduler = Scheduler(
            limits.max_batch_size, limits.max_batch_tokens, limits.max_prefill_tokens, limits.max_queued_requests,
            limits.max_queued_tokens, kv_block=BLOCK, chunk_tokens=limits.prefill_chunk_tokens,
        )  # fmt: skip
        self.model_runner = ModelRunner(model, limits.max_batch_size, limits.max_batch_tokens,
                                        kv_cache=limits.kv_cache_dtype)  # fmt: skip
        self.prefix_cache = PrefixCache(limits.prefix_cache_bytes)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._allocated = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()
        # tokens -> text and events, and every way a request ends
        self.output = Output(self.model_runner, self.scheduler, self._stats, self.observer, frozenset(eos_token_ids))
        # the step's forward passes: decode, a chunk of a long prompt, the newly admitted prompts
        self.executor = StepExecutor(self.model_runner, self.scheduler, self.prefix_cache, self.output, self._stats,
                                     limits, self.grammars)  # fmt: skip
        self._tokens_per_s = 0.0  # smoothed decode throughput, for Retry-After
        self.fatal: BaseException | None = None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokens that end a sequence (unless it asks to ignore them)."""
        return self.output.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: frozenset[int]) -> None:
        self.output.eos_token_ids = frozenset(ids)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine's thread and wait until its buffers are allocated.

        With `threads`, the model's multi-threaded work runs on the engine's thread only: the caller's thread
        is set to one torch thread, so it never starts a pool of OpenMP workers of its own (two live pools
        on a machine with as many cores as one of them stop spin-waiting, which made a one-row decode step
        38 ms instead of 26: app/models/loading/loader.py)."""
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
        example = self.model_runner.kv_example()
        self.model_runner.allocate(example)
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
                self.scheduler.abandon(state)  # the engine's thread, should it come back, sends nothing more
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
        return [s for s in self.scheduler.requests() if isinstance(s, RequestState)]

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
                    self.output.fail(state, EngineStopped("the server is shutting down"))
                self.model_runner.clear()  # rows of requests `stop` told while this thread was still in a step
        except BaseException as exc:  # the loop must never die silently
            log.exception("engine loop died")
            self.fatal = exc
            self._allocated.set()
            self._stop.set()
            for state in self._all_requests():
                self.output.fail(state, EngineStopped("the engine stopped after an internal error"))

    def _run_until_stopped(self) -> None:
        trim = self.model_runner.device.type == "cpu"  # the heap holds the tensors only there (app/engine/memory.py)
        busy = False
        trimmed = time.monotonic()
        while not self._stop.is_set():
            if not self.scheduler.running and not self.scheduler.queued:
                if busy and trim:  # just went idle: hand what the burst freed back to the OS
                    release_free_memory()
                    busy = False
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            busy = True
            self.step()
            if trim and time.monotonic() - trimmed > TRIM_INTERVAL_S:
                # under steady load too: freed blocks of every size would otherwise stay resident
                release_free_memory()
                trimmed = time.monotonic()

    def step(self) -> None:
        """schedule -> run -> postprocess; the step's events reach the asyncio side together."""
        with collected():
            self._step()

    def _step(self) -> None:
        now = time.monotonic()
        self._drop_cancelled_and_late(now)
        plan = self.scheduler.schedule(now)
        for state in plan.expired:
            self.output.fail(state, RequestTimeout(f"request waited {now - state.arrival:.1f}s in the queue; "
                                                   f"its timeout is {self.input.timeout(state.request):g}s"))
        for state in plan.cancelled:
            self.output.close(state)
        started = time.perf_counter()
        rows = len(self.model_runner.seqs)
        run = self.executor
        produced = run.decode() + run.prefill_chunk() + run.prefill(plan.admitted)
        elapsed = time.perf_counter() - started
        if rows or plan.admitted:
            self.observer.step(rows, elapsed)
        self._stats.busy_seconds += elapsed
        if produced:
            rate = produced / max(elapsed, 1e-6)
            self._tokens_per_s = rate if not self._tokens_per_s else 0.9 * self._tokens_per_s + 0.1 * rate
        self._stats.steps += 1

    def _drop_cancelled_and_late(self, now: float) -> None:
        for state in self._running():
            if state.cancelled:
                self.output.close(state)
            elif now > state.deadline:
                self.output.fail(state, RequestTimeout(
                    f"request ran past its timeout of {self.input.timeout(state.request):g}s"))  # fmt: skip

    def _running(self) -> list[RequestState]:
        return [s for s in self.scheduler.running.values() if isinstance(s, RequestState)]

    # ---- introspection ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self._stats
        memory = device_memory(self.model_runner.device)
        return replace(
            s,
            running_requests=len(self.scheduler.running),
            running_rows=len(self.model_runner.seqs),
            waiting=self.scheduler.queued,
            kv_cache_bytes=self.model_runner.cache.nbytes(),
            kv_cache_capacity_bytes=self.model_runner.cache.capacity_bytes(),
            device_memory_reserved_bytes=memory.reserved_bytes,
            device_memory_peak_bytes=memory.peak_allocated_bytes,
            decode_attention="ragged-c-kernel" if self.model_runner.cache.kernel is not None else "torch",
            kv_cache_dtype=str(self.model_runner.cache.store).removeprefix("torch."),
            prefix_cache_bytes=self.prefix_cache.nbytes,
            prefix_cache_entries=len(self.prefix_cache),
            prefix_hit_tokens=self.prefix_cache.hit_tokens,
            batch_sizes=Counter(s.batch_sizes),
        )
