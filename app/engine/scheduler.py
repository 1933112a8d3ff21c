"""Who runs next, and where every request is in its life: the one owner of a request's status.

Torch-free, so it is tested with fake requests. The scheduler holds the three containers of a request's life:
`waiting` (FIFO), `prefilling` (admitted prompts longer than a chunk, computed a chunk per step, oldest first)
and `running` (admitted and not finished, by request id), and it alone writes `Status`:
WAITING (queued) -> PREFILLING (`schedule` admits it) -> RUNNING (`started`: its first tokens are drawn)
-> FINISHED / FAILED / CANCELLED (`retire`, called by the output stage's one `retire`).

Admission is in arrival order under four budgets:
- rows: sequences decoded together (max batch size);
- KV tokens: the sum over running sequences of prompt + max_new_tokens (rounded up to the cache's block),
  reserved at admission, so a running batch can never outgrow the cache it was promised. The cache is
  ragged (each row holds its own segment), so one long prompt takes its tokens and no more: the rows
  beside it are not narrowed to fit its length;
- waiting: requests and their tokens (prompt + max new tokens per row) queued, beyond which 429;
- prefill tokens per step: prompt tokens prefilled in one step, so a burst of newcomers does not stall
  the rows that are decoding (at least one request is always admitted).

Chunked prefill is decided here too: an admitted prompt longer than `chunk_tokens` (one that needs no
log-probabilities of its own positions) joins `prefilling`; while one is there, a step's newcomers get the
prefill budget less one chunk, and prompts longer than a chunk wait in their place (admitting them would
only hold KV budget idle).
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from app.engine.errors import Overloaded


class Status(enum.Enum):
    """Where a request is in its life; the last three are final. Written by the Scheduler alone."""

    WAITING = "waiting"  # queued in the scheduler
    PREFILLING = "prefilling"  # admitted: its prompt is being computed (a long one: a chunk per step)
    RUNNING = "running"  # its sequences decode in the batch
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"  # the client went away


FINAL = frozenset({Status.FINISHED, Status.FAILED, Status.CANCELLED})


class Schedulable(Protocol):
    id: str
    status: Status
    admitted_at: float | None

    @property
    def prefill_tokens(self) -> int: ...  # tokens its prefill processes
    @property
    def rows(self) -> int: ...  # sequences this request decodes
    @property
    def kv_rows(self) -> int: ...  # KV segments it holds: its sequences (a scoring request: 1)
    @property
    def reserved_tokens(self) -> int: ...  # per segment: prompt + max new tokens
    @property
    def deadline(self) -> float: ...
    @property
    def cancelled(self) -> bool: ...
    @property
    def chunkable(self) -> bool: ...  # its prompt may be computed a chunk per step


@dataclass
class StepPlan:
    """What one step does with the queue; `Scheduler.schedule` makes it."""

    admitted: list = field(default_factory=list)  # prefill these this step
    chunked: list = field(default_factory=list)  # admitted into `prefilling`: a chunk per step from the next one
    expired: list = field(default_factory=list)  # waited past their deadline: fail, never compute
    cancelled: list = field(default_factory=list)  # client went away while waiting


class Scheduler:
    def __init__(self, max_rows: int, max_batch_tokens: int, max_prefill_tokens: int, max_waiting: int,
                 max_waiting_tokens: int | None = None, kv_block: int = 1,
                 chunk_tokens: int | None = None) -> None:  # fmt: skip
        self.max_rows = max_rows
        self.kv_block = kv_block  # the cache holds whole blocks: a row is charged its tokens rounded up to one
        self.max_waiting_tokens = max_waiting_tokens
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting
        self.chunk_tokens = chunk_tokens  # prompts longer than this are prefilled a chunk per step (None: never)
        self.waiting: deque[Schedulable] = deque()
        self.prefilling: deque[Schedulable] = deque()  # admitted prompts computed a chunk per step, oldest first
        self.running: dict[str, Schedulable] = {}  # admitted, not finished; engine thread only
        self.running_rows = 0
        self.running_tokens = 0
        self._lock = threading.Lock()  # add() runs on the event loop, the rest on the engine thread

    def add(self, request: Schedulable, retry_after: float) -> None:
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded(
                    f"the server is at capacity ({len(self.waiting)} requests waiting); retry later",
                    retry_after=retry_after,
                )
            if self.max_waiting_tokens is not None and self.waiting:
                # (an empty queue always takes one: a request alone over the bound would never run)
                queued = self._queued_tokens() + request.kv_rows * request.reserved_tokens
                if queued > self.max_waiting_tokens:
                    raise Overloaded(
                        f"the server is at capacity ({len(self.waiting)} requests, {queued} tokens of work "
                        f"waiting; the limit is {self.max_waiting_tokens}); retry later",
                        retry_after=retry_after,
                    )
            self.waiting.append(request)

    def schedule(self, now: float, prefill_budget: int | None = None,
                 defer_longer_than: int | None = None) -> StepPlan:  # fmt: skip
        """Admit in arrival order while the budgets allow. `prefill_budget` (default: the max prefill tokens,
        less a chunk while a prompt is in `prefilling`) is what this step's prefills may use.
        `defer_longer_than` (default: a chunk, while a prompt is in `prefilling`): prompts longer than this
        stay queued, in their place, and the requests behind them are considered."""
        plan = StepPlan()
        prefill = 0
        chunk = self.chunk_tokens if self.prefilling and self.chunk_tokens is not None else 0
        if prefill_budget is None:
            prefill_budget = max(0, self.max_prefill_tokens - chunk)
        if defer_longer_than is None and chunk:
            defer_longer_than = chunk
        budget = prefill_budget
        with self._lock:
            deferred: list[Schedulable] = []
            while self.waiting:
                head = self.waiting[0]
                if head.cancelled:
                    plan.cancelled.append(self.waiting.popleft())
                    continue
                if now > head.deadline:
                    plan.expired.append(self.waiting.popleft())
                    continue
                if defer_longer_than is not None and head.prefill_tokens > defer_longer_than:
                    deferred.append(self.waiting.popleft())
                    continue
                rows = self.running_rows + head.rows
                tokens = self.running_tokens + head.kv_rows * self.charge(head)
                if rows > self.max_rows or tokens > self.max_batch_tokens:
                    break
                if plan.admitted and prefill + head.prefill_tokens > budget:
                    break
                self.waiting.popleft()
                plan.admitted.append(head)
                prefill += head.prefill_tokens
                self.running_rows = rows
                self.running_tokens = tokens
            self.waiting.extendleft(reversed(deferred))  # back at the front, in their order
            # Requests behind a blocked head may also have expired or been cancelled.
            for request in list(self.waiting):
                if request.cancelled or now > request.deadline:
                    self.waiting.remove(request)
                    (plan.cancelled if request.cancelled else plan.expired).append(request)
        self._admit(plan, now)
        return plan

    def _admit(self, plan: StepPlan, now: float) -> None:
        """The admitted are PREFILLING; a prompt longer than a chunk moves to `prefilling` (shortest first, as the
        step's prefills run)."""
        for request in sorted(plan.admitted, key=lambda r: r.prefill_tokens):
            request.status = Status.PREFILLING
            request.admitted_at = now
            if self.chunk_tokens is not None and request.chunkable and request.prefill_tokens > self.chunk_tokens:
                self.prefilling.append(request)
                self.running[request.id] = request
                plan.chunked.append(request)
        if plan.chunked:
            plan.admitted = [r for r in plan.admitted if r not in plan.chunked]

    def started(self, request: Schedulable) -> None:
        """Its prompt is computed and its first tokens drawn: it runs (its sequences join the batch)."""
        self.running[request.id] = request
        request.status = Status.RUNNING

    def chunk_done(self, request: Schedulable) -> None:
        """The last chunk of `request`'s prompt is computed (or failed): it leaves `prefilling`."""
        if request in self.prefilling:
            self.prefilling.remove(request)

    def retire(self, request: Schedulable, status: Status) -> None:
        """The request ends with a final `status`: out of every container. (Its KV budget is given back with
        `release`, by the sequences that held it.)"""
        self.running.pop(request.id, None)
        self.chunk_done(request)
        request.status = status

    def abandon(self, request: Schedulable) -> None:
        """Marked failed from outside the engine's thread (the engine is stuck in a step at shutdown): its
        thread, should it come back, sends nothing more for it."""
        request.status = Status.FAILED

    def release(self, request: Schedulable, rows: int = 1) -> None:
        """`rows` of a running request's KV segments are given back: sequences that left the batch, or a scoring
        request's (which holds no batch row) once it is computed."""
        if request.rows:
            self.running_rows -= rows
        self.running_tokens -= rows * self.charge(request)

    def charge(self, request: Schedulable) -> int:
        """KV tokens one segment of `request` holds: prompt + max new tokens, in whole blocks."""
        return -(-request.reserved_tokens // self.kv_block) * self.kv_block

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def requests(self) -> list[Schedulable]:
        """Every request not finished: running (and prefilling), then waiting."""
        with self._lock:
            waiting = list(self.waiting)
        return [*self.running.values(), *waiting]

    def queued_tokens(self) -> int:
        with self._lock:
            return self._queued_tokens()

    def _queued_tokens(self) -> int:
        return sum(r.kv_rows * r.reserved_tokens for r in self.waiting)


class ChunkPacer:
    """How many tokens the long prompt being prefilled computes this step.

    A chunk is one step's work beside the rows that decode: at a fixed size (512), a 6000-token prompt's
    chunks grow to ~1.5 s each as its attention reaches back further, and every running row waits that long
    for each token. So while rows decode, the next chunk is sized from the last one's measured rate to take
    about `share` times as long as the step's decode (the decoding rows keep at least half the machine);
    with no rows decoding it takes the largest chunk. Never below `min_tokens`: the prompt always advances.
    """

    def __init__(self, max_tokens: int, min_tokens: int = 16, share: float = 1.0, align: int = 16) -> None:
        self.max_tokens = max_tokens
        self.min_tokens = min(min_tokens, max_tokens)
        self.share = share
        self.align = align
        self.next = max_tokens

    def size(self) -> int:
        return self.next

    def observe(self, tokens: int, seconds: float, decode_seconds: float) -> None:
        """The chunk just computed: `tokens` in `seconds`, beside a decode that took `decode_seconds` (0: none)."""
        if decode_seconds <= 0 or seconds <= 0:
            self.next = self.max_tokens
            return
        fit = int(tokens * self.share * decode_seconds / seconds) // self.align * self.align
        self.next = max(self.min_tokens, min(self.max_tokens, fit))
