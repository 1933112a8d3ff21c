"""Who runs next: a FIFO waiting queue admitted into the running batch under three budgets.

Torch-free, so it is tested with fake requests. Budgets:
- rows: sequences decoded together (max batch size);
- KV tokens: the sum over running sequences of prompt + max_new_tokens (rounded up to the cache's block),
  reserved at admission, so a running batch can never outgrow the cache it was promised. The cache is
  ragged (each row holds its own segment), so one long prompt takes its tokens and no more: the rows
  beside it are not narrowed to fit its length;
- waiting: requests and their tokens (prompt + max new tokens per row) queued, beyond which 429;
- prefill tokens per step: prompt tokens prefilled in one step, so a burst of newcomers
  does not stall the rows that are decoding (at least one request is always admitted; a prompt longer
  than a chunk is then prefilled a chunk per step by the engine, which lowers this step's budget by one
  chunk while it does).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from app.engine.errors import Overloaded


class Schedulable(Protocol):
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


@dataclass
class Plan:
    admitted: list = field(default_factory=list)  # prefill these this step
    expired: list = field(default_factory=list)  # waited past their deadline: fail, never compute
    cancelled: list = field(default_factory=list)  # client went away while waiting


class Scheduler:
    def __init__(self, max_rows: int, max_batch_tokens: int, max_prefill_tokens: int, max_waiting: int,
                 max_waiting_tokens: int | None = None, kv_block: int = 1) -> None:  # fmt: skip
        self.max_rows = max_rows
        self.kv_block = kv_block  # the cache holds whole blocks: a row is charged its tokens rounded up to one
        self.max_waiting_tokens = max_waiting_tokens
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Schedulable] = deque()
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

    def schedule(self, now: float, prefill_budget: int | None = None, defer_longer_than: int | None = None) -> Plan:
        """Admit in arrival order while the budgets allow. `prefill_budget` (default: the scheduler's max
        prefill tokens) is what this step's prefills may use. `defer_longer_than`: while a long prompt is
        being prefilled in chunks (one at a time), prompts longer than this stay queued, in their place,
        and the requests behind them are considered: admitting them would only hold KV budget idle."""
        plan = Plan()
        prefill = 0
        budget = self.max_prefill_tokens if prefill_budget is None else prefill_budget
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
        return plan

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
