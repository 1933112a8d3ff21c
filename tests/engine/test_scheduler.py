from dataclasses import dataclass

import pytest

from app.engine.errors import Overloaded
from app.engine.scheduler import ChunkPacer, Scheduler


@dataclass(eq=False)
class Fake:
    prompt_len: int = 10
    rows: int = 1
    max_new: int = 10
    deadline: float = 1e9
    cancelled: bool = False

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_len

    @property
    def kv_rows(self) -> int:
        return self.rows

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_len + self.max_new


def test_fifo_admission_up_to_max_rows_then_release_makes_room() -> None:
    s = Scheduler(max_rows=2, max_batch_tokens=10_000, max_prefill_tokens=10_000, max_waiting=10)
    a, b, c = Fake(), Fake(), Fake()
    for r in (a, b, c):
        s.add(r, retry_after=1)
    assert s.schedule(0).admitted == [a, b]
    assert s.schedule(0).admitted == []
    s.release(a)
    assert s.schedule(0).admitted == [c]
    assert s.running_rows == 2


def test_kv_token_budget_counts_every_sequence() -> None:
    s = Scheduler(max_rows=10, max_batch_tokens=100, max_prefill_tokens=10_000, max_waiting=10)
    big = Fake(prompt_len=30, max_new=20, rows=2)  # 2 x 50 = 100 tokens
    small = Fake(prompt_len=1, max_new=1)
    s.add(big, 1)
    s.add(small, 1)
    plan = s.schedule(0)
    assert plan.admitted == [big]
    assert s.running_tokens == 100
    s.release(big, rows=2)
    assert s.schedule(0).admitted == [small]


def test_prefill_budget_bounds_prompt_tokens_per_step_but_always_admits_one() -> None:
    s = Scheduler(max_rows=10, max_batch_tokens=10_000, max_prefill_tokens=100, max_waiting=10)
    huge, short1, short2 = Fake(prompt_len=500), Fake(prompt_len=40), Fake(prompt_len=40)
    for r in (huge, short1, short2):
        s.add(r, 1)
    assert s.schedule(0).admitted == [huge]  # alone it exceeds the budget, but the head always goes
    # two prompts of 40 make 80 <= 100; a third would make 120
    s.add(Fake(prompt_len=40), 1)
    assert s.schedule(0).admitted == [short1, short2]


def test_queue_full_raises_overloaded_with_retry_after() -> None:
    s = Scheduler(max_rows=1, max_batch_tokens=10_000, max_prefill_tokens=10_000, max_waiting=1)
    s.add(Fake(), 1)
    with pytest.raises(Overloaded) as info:
        s.add(Fake(), retry_after=7)
    assert info.value.retry_after == 7


def test_expired_and_cancelled_waiting_requests_are_dropped_not_admitted() -> None:
    s = Scheduler(max_rows=1, max_batch_tokens=10_000, max_prefill_tokens=10_000, max_waiting=10)
    running, late, gone, ok = Fake(), Fake(deadline=5), Fake(), Fake()
    for r in (running, late, gone, ok):
        s.add(r, 1)
    assert s.schedule(0).admitted == [running]
    gone.cancelled = True
    plan = s.schedule(10)  # the head is blocked by max_rows; the ones behind still get dropped
    assert plan.admitted == []
    assert plan.expired == [late]
    assert plan.cancelled == [gone]
    assert list(s.waiting) == [ok]


def test_waiting_work_is_bounded_in_tokens_too() -> None:
    s = Scheduler(max_rows=1, max_batch_tokens=10_000, max_prefill_tokens=10_000, max_waiting=100,
                  max_waiting_tokens=100)  # fmt: skip
    huge = Fake(prompt_len=100, max_new=100)  # 200 tokens: over the bound, but the queue is empty
    s.add(huge, 1)
    with pytest.raises(Overloaded, match="tokens of work waiting"):
        s.add(Fake(prompt_len=1, max_new=1), retry_after=7)
    assert s.schedule(0).admitted == [huge]  # the queue drains; room again
    s.add(Fake(prompt_len=40, max_new=10, rows=2), 1)  # 100 tokens: exactly the bound
    with pytest.raises(Overloaded) as exc:
        s.add(Fake(prompt_len=1, max_new=1), retry_after=7)
    assert exc.value.retry_after == 7


def test_a_long_row_takes_its_own_tokens_and_does_not_narrow_the_batch() -> None:
    """The cache is ragged: rows are charged their own tokens, not rows x the longest row (which admitted the
    long one and a single short row here)."""
    s = Scheduler(max_rows=32, max_batch_tokens=1000, max_prefill_tokens=10_000, max_waiting=100)
    long = Fake(prompt_len=400, max_new=100)  # 500 tokens
    shorts = [Fake(prompt_len=5, max_new=5) for _ in range(60)]  # 10 tokens each
    s.add(long, 1)
    for r in shorts:
        s.add(r, 1)
    assert s.schedule(0).admitted == [long, *shorts[:31]]  # 32 rows, 810 tokens
    assert s.running_tokens == 810


def test_rows_are_charged_whole_kv_blocks() -> None:
    s = Scheduler(max_rows=32, max_batch_tokens=64, max_prefill_tokens=10_000, max_waiting=100, kv_block=16)
    rows = [Fake(prompt_len=5, max_new=5) for _ in range(5)]  # 10 tokens, one block of 16 each
    for r in rows:
        s.add(r, 1)
    assert s.schedule(0).admitted == rows[:4]  # 4 x 16 = 64
    s.release(rows[0])
    assert s.running_tokens == 48


def test_long_prompts_wait_in_place_while_one_is_prefilled_in_chunks() -> None:
    s = Scheduler(max_rows=8, max_batch_tokens=20_000, max_prefill_tokens=3000, max_waiting=10)
    long_a, long_b, short, long_c, short2 = Fake(3000), Fake(3000), Fake(10), Fake(3000), Fake(10)
    for r in (long_a, long_b, short, long_c, short2):
        s.add(r, retry_after=1)
    assert s.schedule(0).admitted == [long_a]  # the prefill budget: one long prompt
    # long_a is being chunked: the other long prompts keep their places, the short ones go ahead
    assert s.schedule(0, defer_longer_than=512).admitted == [short, short2]
    assert list(s.waiting) == [long_b, long_c]
    assert s.schedule(0).admitted == [long_b]  # long_a is done prefilling: the oldest long prompt is next


def test_the_chunk_pacer_sizes_a_chunk_to_the_decode_beside_it() -> None:
    pacer = ChunkPacer(512, min_tokens=16)
    assert pacer.size() == 512  # nothing decoding: the largest chunk
    pacer.observe(512, seconds=1.0, decode_seconds=0.1)  # 512 tokens took 10x the decode step
    assert pacer.size() == 48  # ~0.1 s of chunk at that rate, whole blocks
    pacer.observe(48, seconds=0.5, decode_seconds=0.1)  # the prefix grew: slower per token
    assert pacer.size() == 16  # never below the minimum: the prompt always advances
    pacer.observe(16, seconds=0.01, decode_seconds=0.1)
    assert pacer.size() == 160
    pacer.observe(160, seconds=0.2, decode_seconds=0.0)  # the rows left
    assert pacer.size() == 512
