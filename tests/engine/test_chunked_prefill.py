"""Prompts longer than a chunk are prefilled a chunk per step while the batch keeps decoding: the output
is transformers' own, and short requests that arrive behind a long prompt do not wait for it."""

from __future__ import annotations

import asyncio

import pytest

from app.engine.types import GenerationRequest
from app.models.loading.loader import LoadedModel
from tests.engine.helpers import PROMPTS, eventually, make_engine, reference_greedy, run_request

LONG = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(40))  # ~280 tokens


async def test_a_short_request_finishes_while_a_long_prompt_is_still_prefilling(tiny: LoadedModel) -> None:
    engine = make_engine(tiny, prefill_chunk_tokens=16)
    long_ids = [(i * 37) % 900 + 50 for i in range(900)]  # 57 chunks of 16
    finished: list[str] = []
    try:
        async def one(name: str, prompt: list[int] | str, delay: float) -> None:
            out = await run_request(engine, GenerationRequest(prompt=prompt, max_new_tokens=6, ignore_eos=True),
                                    delay=delay)  # fmt: skip
            assert out.error is None and len(out.tokens) == 6
            finished.append(name)

        long = asyncio.create_task(one("long", long_ids, 0))
        assert await eventually(lambda: engine.scheduler.prefilling and engine.scheduler.prefilling[0].prefilled > 0)
        await one("short", "Hello there", 0)
        assert engine.scheduler.prefilling and engine.scheduler.prefilling[0].prefilled < 900  # still at it
        await long
    finally:
        engine.stop()
    assert finished == ["short", "long"]


async def test_a_second_long_prompt_waits_without_holding_kv_budget_from_short_ones(tiny: LoadedModel) -> None:
    # 2000 KV tokens: two 900-token prompts fill it; admitting the second while the first is still being
    # prefilled would keep the short request out until the first one had finished
    engine = make_engine(tiny, prefill_chunk_tokens=16, max_batch_tokens=2000)
    finished: list[str] = []

    async def one(name: str, prompt: list[int] | str) -> None:
        out = await run_request(engine, GenerationRequest(prompt=prompt, max_new_tokens=6, ignore_eos=True))
        assert out.error is None and len(out.tokens) == 6
        finished.append(name)

    try:
        first = asyncio.create_task(one("long 1", [(i * 37) % 900 + 50 for i in range(900)]))
        assert await eventually(lambda: engine.scheduler.prefilling and engine.scheduler.prefilling[0].prefilled > 0)
        second = asyncio.create_task(one("long 2", [(i * 31) % 900 + 50 for i in range(900)]))
        await asyncio.sleep(0.05)
        await one("short", "Hello there")
        await asyncio.gather(first, second)
    finally:
        engine.stop()
    assert finished == ["short", "long 1", "long 2"]


@pytest.mark.parametrize("chunk", [16, 100])
async def test_tiny_chunked_prefill_matches_generate(tiny: LoadedModel, chunk: int) -> None:
    engine = make_engine(tiny, prefill_chunk_tokens=chunk)
    try:
        outs = await asyncio.gather(
            run_request(engine, GenerationRequest(prompt=LONG, max_new_tokens=10)),
            *(run_request(engine, GenerationRequest(prompt=p, max_new_tokens=12), delay=0.01 * i)
              for i, p in enumerate(PROMPTS[:4])),
        )  # fmt: skip
    finally:
        engine.stop()
    assert outs[0].tokens == reference_greedy(tiny, LONG, 10)
    for out, prompt in zip(outs[1:], PROMPTS[:4], strict=True):
        assert out.tokens == reference_greedy(tiny, prompt, 12)


@pytest.mark.smollm
async def test_smollm_chunked_prefill_matches_generate_with_and_without_a_kept_prefix(smollm: LoadedModel) -> None:
    engine = make_engine(smollm, prefill_chunk_tokens=64)
    second = LONG + " Which box is item 7?"
    try:
        crowd = [run_request(engine, GenerationRequest(prompt=p, max_new_tokens=16), delay=0.05 * i)
                 for i, p in enumerate(PROMPTS[:3])]  # fmt: skip
        first, *_ = await asyncio.gather(run_request(engine, GenerationRequest(prompt=LONG, max_new_tokens=12)),
                                         *crowd)  # fmt: skip
        # the second starts with the whole first prompt: its first chunk starts after the kept prefix
        again = await run_request(engine, GenerationRequest(prompt=second, max_new_tokens=12))
        reused = engine.prefix_cache.hit_tokens
    finally:
        engine.stop()
    assert first.tokens == reference_greedy(smollm, LONG, 12)
    assert again.tokens == reference_greedy(smollm, second, 12)
    assert reused >= 200


async def test_cancelling_a_long_prompt_mid_prefill_frees_it(tiny: LoadedModel) -> None:
    engine = make_engine(tiny, prefill_chunk_tokens=16)
    try:
        long = GenerationRequest(prompt=[(i * 7) % 500 + 10 for i in range(900)], max_new_tokens=4)
        stream = await engine.submit(long)
        assert await eventually(lambda: engine.scheduler.prefilling and engine.scheduler.prefilling[0].prefilled > 0)
        await stream.aclose()
        assert await eventually(lambda: engine.stats().running_requests == 0 and not engine.scheduler.prefilling)
        assert engine.scheduler.running_tokens == 0 and engine.scheduler.running_rows == 0
        out = await run_request(engine, GenerationRequest(prompt="Hello", max_new_tokens=3))
        assert out.error is None and len(out.tokens) == 3
    finally:
        engine.stop()


async def test_short_rows_decode_beside_a_long_one_in_one_batch(tiny: LoadedModel) -> None:
    """The ragged cache charges each row its own tokens: a 900-token row and 12 short ones (2,000 KV tokens in
    all) decode in one step. The rectangular cache it replaced fitted 2000 // 940 = 2 rows beside it."""
    engine = make_engine(tiny, max_batch_tokens=2000)
    long_ids = [(i * 37) % 900 + 50 for i in range(900)]
    try:
        long = asyncio.create_task(run_request(engine, GenerationRequest(prompt=long_ids, max_new_tokens=40,
                                                                         ignore_eos=True)))  # fmt: skip
        assert await eventually(lambda: len(engine.model_runner.seqs) == 1)
        shorts = [run_request(engine, GenerationRequest(prompt=p, max_new_tokens=20, ignore_eos=True))
                  for p in (PROMPTS * 4)[:12]]  # fmt: skip
        outs = await asyncio.gather(long, *shorts)
    finally:
        engine.stop()
    assert all(o.error is None for o in outs)
    assert max(engine.stats().batch_sizes) == 13
    for prompt, out in zip((PROMPTS * 4)[:12], outs[1:], strict=True):  # greedy, as if each ran alone
        assert out.tokens == reference_greedy(tiny, prompt, 20)
