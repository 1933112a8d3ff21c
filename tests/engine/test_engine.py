"""Engine behaviour on the tiny model: limits, stops, n sequences, cancellation, timeouts, failures."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
import torch

from app.engine.engine import Engine
from app.engine.errors import EngineStopped, InvalidRequest, Overloaded, RequestTimeout, StepFailed
from app.engine.state import Status
from app.engine.types import (
    GenerationRequest,
    RequestFinished,
    SamplingParams,
    ScoreRequest,
    SequenceFinished,
    TokenDelta,
)
from app.models.loading.loader import LoadedModel
from tests.engine.helpers import eventually, make_engine, reference_greedy, run_request


@pytest.fixture
def engine(tiny: LoadedModel):  # type: ignore[no-untyped-def]
    eng = make_engine(tiny)
    yield eng
    eng.stop()


def split_stop(model: LoadedModel, prompt: str, n: int) -> tuple[str, str]:
    """A stop string made of the end of one generated token and the start of the next."""
    tokens = reference_greedy(model, prompt, n)
    pieces = [model.tokenizer.decode([t]) for t in tokens]
    for a, b in itertools.pairwise(pieces):
        if len(a.strip()) >= 2 and len(b.strip()) >= 2:
            stop = a[-2:] + b[:2]
            full = model.tokenizer.decode(tokens)
            return stop, full[: full.find(stop)]
    raise AssertionError("no usable token boundary")


async def test_max_length_counts_the_prompt(engine: Engine, tiny: LoadedModel) -> None:
    prompt_len = len(tiny.tokenizer.encode("Hello world"))
    out = await run_request(engine, GenerationRequest(prompt="Hello world", max_length=prompt_len + 7))
    assert len(out.tokens) == 7 and out.sequences[0].finish_reason == "length"
    assert out.finished is not None and out.finished.prompt_tokens == prompt_len


async def test_stop_string_across_tokens_is_trimmed(engine: Engine, tiny: LoadedModel) -> None:
    stop, expected = split_stop(tiny, "The capital of France is", 40)
    out = await run_request(engine, GenerationRequest(prompt="The capital of France is", max_new_tokens=40,
                                                      stop=(stop,)))  # fmt: skip
    seq = out.sequences[0]
    assert seq.finish_reason == "stop"
    assert seq.text == expected
    assert "".join(d.text for d in out.deltas) == expected  # the stream never showed any of the stop


async def test_eos_finishes_with_reason_eos(engine: Engine, tiny: LoadedModel) -> None:
    eos = tiny.info.eos_token_ids[0]
    # A random model rarely says EOS; declare the 3rd token of its greedy output to be the EOS instead.
    first = reference_greedy(tiny, "In 1990,", 5)
    engine.eos_token_ids = frozenset({first[2]})
    out = await run_request(engine, GenerationRequest(prompt="In 1990,", max_new_tokens=20))
    engine.eos_token_ids = frozenset({eos})
    assert out.sequences[0].finish_reason == "eos"
    assert out.tokens == first[:3]
    ignored = await run_request(engine, GenerationRequest(prompt="In 1990,", max_new_tokens=5, ignore_eos=True))
    assert ignored.tokens == first


async def test_num_return_sequences_are_distinct_and_reproducible(engine: Engine) -> None:
    params = SamplingParams(do_sample=True, temperature=1.0, seed=7)
    req = GenerationRequest(prompt="Once upon a time", max_new_tokens=12, num_return_sequences=3, sampling=params)
    a = await run_request(engine, req)
    b = await run_request(engine, req)
    texts = [a.sequences[i].text for i in range(3)]
    assert len(set(texts)) == 3
    assert texts == [b.sequences[i].text for i in range(3)]
    assert [a.sequences[i].seed for i in range(3)] == [7, 8, 9]
    assert a.finished is not None and a.finished.completion_tokens == 36
    for i in range(3):  # each the same as a request of its own with that seed
        alone = replace(req, num_return_sequences=1, sampling=replace(params, seed=7 + i))
        assert (await run_request(engine, alone)).sequences[0].text == texts[i]


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "hi", "max_new_tokens": 5000}, "max_new_tokens"),
        ({"prompt": "hi there friend", "max_length": 2}, "max_length"),
        ({"prompt": "hi " * 1100}, "prompt"),
        ({"prompt": "hi " * 1000, "max_new_tokens": 100}, "max_new_tokens"),
        ({"prompt": "hi", "num_return_sequences": 2}, "num_return_sequences"),
        ({"prompt": "hi", "sampling": SamplingParams(temperature=-1)}, "temperature"),
        ({"prompt": "hi", "sampling": SamplingParams(top_p=0)}, "top_p"),
        ({"prompt": [1, 2, 99999999]}, "prompt"),
    ],
)
async def test_invalid_requests_name_the_field(engine: Engine, request_kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await engine.submit(GenerationRequest(**request_kwargs))
    assert info.value.field == field


async def test_prompt_too_long_names_both_numbers(engine: Engine, tiny: LoadedModel) -> None:
    prompt = "hi " * 1100
    n = len(tiny.tokenizer.encode(prompt))
    with pytest.raises(InvalidRequest) as info:
        await engine.submit(GenerationRequest(prompt=prompt))
    assert str(n) in info.value.message and "1024" in info.value.message


async def test_cancel_frees_the_row_and_others_continue(engine: Engine) -> None:
    long = GenerationRequest(prompt="Hello", max_new_tokens=900, ignore_eos=True)
    keep = asyncio.ensure_future(run_request(engine, long))
    stream = await engine.submit(long)
    async for event in stream:
        if isinstance(event, TokenDelta):
            break
    assert await eventually(lambda: engine.stats().running_rows == 2)
    await stream.aclose()
    assert await eventually(lambda: engine.stats().running_rows <= 1)
    out = await keep
    assert out.error is None and len(out.tokens) == 900
    # the cancelled request stopped early: far fewer than its 900 tokens were generated for it
    assert engine.stats().generated_tokens - 900 < 900
    assert engine.stats().running_rows == 0 and engine.scheduler.running_rows == 0


async def test_queue_full_is_overloaded_and_admitted_requests_finish(tiny: LoadedModel) -> None:
    engine = make_engine(tiny, max_batch_size=1, max_queued_requests=1)
    try:
        req = GenerationRequest(prompt="Hello", max_new_tokens=200, ignore_eos=True)
        first = asyncio.ensure_future(run_request(engine, req))
        assert await eventually(lambda: engine.stats().running_rows == 1)
        second = await engine.submit(req)  # waits: the only row is taken
        with pytest.raises(Overloaded) as info:
            await engine.submit(req)
        assert info.value.retry_after >= 1
        a = await first
        b = [e for e in [event async for event in second] if isinstance(e, SequenceFinished)]
        assert len(a.tokens) == len(b[0].token_ids) == 200
    finally:
        engine.stop()


async def test_timeouts_while_running_and_while_queued(tiny: LoadedModel) -> None:
    engine = make_engine(tiny, max_batch_size=1, request_timeout=0.6)
    try:
        req = GenerationRequest(prompt="Hello", max_new_tokens=1000, ignore_eos=True)
        short = GenerationRequest(prompt="Hello", max_new_tokens=5, timeout=0.1)  # expires behind `req`
        running, queued = await asyncio.gather(run_request(engine, req), run_request(engine, short, delay=0.01))
        assert isinstance(running.error, RequestTimeout)
        assert isinstance(queued.error, RequestTimeout)
        assert "queue" in str(queued.error)
        assert not queued.deltas  # never computed
        assert engine.stats().running_rows == 0 and engine.scheduler.running_rows == 0
    finally:
        engine.stop()


async def test_a_failed_step_fails_its_rows_and_the_engine_goes_on(engine: Engine, tiny: LoadedModel) -> None:
    original = engine.model_runner.decode
    calls = {"n": 0}

    def flaky():  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return original()

    engine.model_runner.decode = flaky  # type: ignore[method-assign]
    out = await run_request(engine, GenerationRequest(prompt="Hello", max_new_tokens=10))
    assert isinstance(out.error, StepFailed)
    assert engine.stats().running_rows == 0 and engine.scheduler.running_rows == 0
    after = await run_request(engine, GenerationRequest(prompt="Hello", max_new_tokens=10))
    assert after.error is None and after.tokens == reference_greedy(tiny, "Hello", 10)


async def test_a_failed_postprocess_fails_that_request_only(engine: Engine, tiny: LoadedModel) -> None:
    """A join that raises (the cache finding no room: kv_cache.reserve's "an error for this step") used to
    escape the step and kill the loop, and with it every request and the server."""
    original = engine.model_runner.join

    def join(seq):  # type: ignore[no-untyped-def]
        if seq.request.prompt_ids == tiny.tokenizer.encode("Doomed"):
            raise RuntimeError("the KV cache has no room for this row")
        return original(seq)

    engine.model_runner.join = join  # type: ignore[method-assign]
    doomed, fine = await asyncio.gather(
        run_request(engine, GenerationRequest(prompt="Doomed", max_new_tokens=8)),
        run_request(engine, GenerationRequest(prompt="Hello", max_new_tokens=8)),
    )
    assert isinstance(doomed.error, StepFailed) and "postprocessing failed" in str(doomed.error)
    assert fine.error is None and fine.tokens == reference_greedy(tiny, "Hello", 8)
    assert engine.fatal is None and engine.is_running
    assert await eventually(lambda: engine.scheduler.running_rows == 0 and engine.stats().running_rows == 0)
    after = await run_request(engine, GenerationRequest(prompt="Hello", max_new_tokens=8))
    assert after.tokens == fine.tokens


async def test_stop_during_a_long_step_leaves_the_batch_to_the_engine_thread(tiny: LoadedModel) -> None:
    """stop() used to fail the requests, and free their rows, from the caller's thread while the engine's thread
    was still inside a step: two threads changing the batch."""
    engine = make_engine(tiny)
    entered, release = threading.Event(), threading.Event()
    runner = engine.model_runner
    original_decode, original_leave, original_clear = runner.decode, runner.leave, runner.clear
    leavers: list[str] = []

    def slow_decode():  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(30)
        return original_decode()

    def leave(seq):  # type: ignore[no-untyped-def]
        leavers.append(threading.current_thread().name)
        return original_leave(seq)

    def clear():  # type: ignore[no-untyped-def]
        leavers.append(threading.current_thread().name)
        return original_clear()

    engine.model_runner.decode = slow_decode  # type: ignore[method-assign]
    engine.model_runner.leave = leave  # type: ignore[method-assign]
    engine.model_runner.clear = clear  # type: ignore[method-assign]
    task = asyncio.ensure_future(run_request(engine, GenerationRequest(prompt="Hello", max_new_tokens=50)))
    assert await eventually(entered.is_set)
    engine.stop(timeout=0.2)  # the step is still running
    out = await asyncio.wait_for(task, 10)  # told at once, not after the step
    assert isinstance(out.error, EngineStopped)
    release.set()
    engine._thread.join(10)  # type: ignore[union-attr]
    assert not engine._thread.is_alive()  # type: ignore[union-attr]
    assert leavers and set(leavers) == {"textgen-engine"}  # only the engine's thread freed the row
    assert engine.stats().running_rows == 0


async def test_log_probabilities_are_normalized_once_per_token(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # each generated token's row used to go through log_softmax twice (the engine, then token_logprobs)
    calls = {"n": 0}
    original = torch.Tensor.log_softmax

    def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "log_softmax", counted)
    out = await run_request(engine, GenerationRequest(prompt="Hello", max_new_tokens=6, ignore_eos=True,
                                                      logprobs=2))  # fmt: skip
    assert out.error is None and len(out.tokens) == 6
    assert calls["n"] == 6
    alternatives = out.sequences[0].logprobs
    assert len(alternatives) == 6 and all(len(t.top) == 2 and t.top[0][1] >= t.logprob for t in alternatives)


async def test_a_huge_prompt_is_tokenized_off_the_event_loop(engine: Engine, tiny: LoadedModel) -> None:
    """submit used to tokenize on the event loop: every open stream stalled while a 2 MiB prompt was split."""
    text = ("The quick brown fox jumps over the lazy dog. " * 30000)[: 2**20]
    started = time.perf_counter()
    tiny.tokenizer.encode(text)
    tokenize_s = time.perf_counter() - started
    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beating = asyncio.ensure_future(heartbeat())
    await asyncio.sleep(0.01)
    with pytest.raises(InvalidRequest, match="prompt has"):  # far past the context length, found after tokenizing
        await engine.submit(GenerationRequest(prompt=text))
    await asyncio.sleep(0.02)  # the heartbeat's next beat records the gap the submit left
    beating.cancel()
    assert max(gaps) < tokenize_s / 4, (max(gaps), tokenize_s)


async def test_a_decode_step_hands_its_events_to_the_event_loop_at_once(tiny: LoadedModel) -> None:
    """Every token used to be its own call_soon_threadsafe (a wake-up of the loop through its self-pipe); now a
    step's events cross together: one call per step, plus one per prefilled prompt."""
    loop = asyncio.get_running_loop()
    calls = 0
    original = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    engine = make_engine(tiny)
    try:
        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        requests = [GenerationRequest(prompt=f"Row {i} says", max_new_tokens=24, ignore_eos=True) for i in range(8)]
        outs = await asyncio.gather(*[run_request(engine, r) for r in requests])
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
        engine.stop()
    tokens = sum(len(o.tokens) for o in outs)
    assert tokens == 8 * 24 and all(o.error is None for o in outs)
    steps = engine.stats().steps
    # a step each, a prompt's first tokens each, the input stage's tokenization futures; before: >= tokens
    assert calls <= steps + 8 + 8 + 2 < tokens / 3


async def test_a_request_goes_through_one_lifecycle(tiny: LoadedModel) -> None:
    """WAITING -> PREFILLING (a long prompt, chunk by chunk) -> RUNNING -> FINISHED, and CANCELLED for a client that
    leaves; each end releases the KV budget and segment it held (the scheduler and the cache back to empty)."""
    engine = make_engine(tiny, prefill_chunk_tokens=16)
    seen: list[Status] = []
    try:
        task = asyncio.create_task(run_request(engine, GenerationRequest(
            prompt=[(i * 37) % 900 + 50 for i in range(300)], max_new_tokens=30, ignore_eos=True)))  # fmt: skip
        assert await eventually(lambda: bool(engine.scheduler.running))
        state = next(iter(engine.scheduler.running.values()))
        while not state.done:
            if not seen or seen[-1] is not state.status:
                seen.append(state.status)
            await asyncio.sleep(0.001)
        seen.append(state.status)
        await task
        stream = await engine.submit(GenerationRequest(prompt="Hello", max_new_tokens=900, ignore_eos=True))
        async for event in stream:
            if isinstance(event, TokenDelta):
                break
        other = engine.model_runner.seqs[0].request
        await stream.aclose()
        assert await eventually(lambda: other.done)
        assert other.status is Status.CANCELLED
    finally:
        engine.stop()
    assert seen == [Status.PREFILLING, Status.RUNNING, Status.FINISHED]
    held = engine.model_runner.cache.space.held
    assert (engine.scheduler.running_rows, engine.scheduler.running_tokens, held) == (0, 0, 0)


async def test_scoring_is_a_prefill_into_the_kv_cache_and_is_charged_for_it(tiny: LoadedModel) -> None:
    """Scoring computes its prompt into a KV segment like any prompt: it is charged to the KV budget while it
    runs (refused when it could never fit, as generation is) and gives everything back after."""
    engine = make_engine(tiny, max_batch_tokens=64)
    ids = tiny.tokenizer("Review: a fine film.\nSentiment:").input_ids
    try:
        events = [e async for e in await engine.submit(ScoreRequest(prompt=ids, continuations=((4633,), (3967, 13))))]
        assert isinstance(events[-1], RequestFinished)
        with pytest.raises(InvalidRequest) as info:
            await engine.submit(ScoreRequest(prompt=list(range(100, 160)), continuations=((1, 2, 3, 4, 5),)))
        assert info.value.field == "prompt" and "max_batch_tokens is 64" in info.value.message
    finally:
        engine.stop()
    assert (engine.scheduler.running_tokens, engine.model_runner.cache.space.held) == (0, 0)
