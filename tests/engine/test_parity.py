"""Greedy output through the engine equals transformers' generate, token for token, alone and while
other requests join and leave the batch; seeded sampling does not depend on batch-mates."""

from __future__ import annotations

import asyncio

import pytest

from app.engine.types import GenerationRequest, SamplingParams
from app.models.layers.decode_step import LlamaStep, for_model
from app.models.loading.loader import LoadedModel
from tests.engine.helpers import PROMPTS, assert_greedy, make_engine, reference_greedy, run_request


async def check_parity(model: LoadedModel, n_requests: int, max_new: list[int], stagger: float) -> None:
    engine = make_engine(model)
    try:
        jobs = [
            run_request(engine, GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=max_new[i]),
                        delay=stagger * i)
            for i in range(n_requests)
        ]
        outcomes = await asyncio.gather(*jobs)
        sizes = engine.stats().batch_sizes
    finally:
        engine.stop()
    for i, out in enumerate(outcomes):
        assert out.error is None
        prompt = PROMPTS[i % len(PROMPTS)]
        assert_greedy(model, prompt, out.tokens, reference_greedy(model, prompt, max_new[i]), f"request {i}")
    if n_requests > 1:
        # They really shared the batch, and its size changed as rows joined and left.
        assert sizes is not None and max(sizes) >= n_requests // 2 and len(sizes) >= 4


async def test_tiny_greedy_alone_matches_generate(tiny: LoadedModel) -> None:
    await check_parity(tiny, 1, [40], 0)


async def test_tiny_greedy_joins_and_leaves_match_generate(tiny: LoadedModel) -> None:
    max_new = [5 + (i * 13) % 60 for i in range(20)]
    await check_parity(tiny, 20, max_new, stagger=0.01)


async def test_tiny_qwen2_greedy_joins_and_leaves_match_generate(tiny_qwen2: LoadedModel) -> None:
    # Qwen2 runs the written-out step (Llama's, with the q/k/v biases), fp32: token for token
    assert isinstance(for_model(tiny_qwen2.model), LlamaStep)
    max_new = [5 + (i * 13) % 40 for i in range(8)]
    await check_parity(tiny_qwen2, 8, max_new, stagger=0.01)


@pytest.mark.smollm
async def test_smollm_greedy_alone_matches_generate(smollm: LoadedModel) -> None:
    await check_parity(smollm, 1, [24], 0)


@pytest.mark.smollm
async def test_smollm_greedy_joins_and_leaves_match_generate(smollm: LoadedModel) -> None:
    max_new = [4 + (i * 7) % 29 for i in range(16)]
    await check_parity(smollm, 16, max_new, stagger=0.08)


async def test_tiny_repetition_penalty_matches_generate_alone_and_among_others(tiny: LoadedModel) -> None:
    # the penalty reads each row's own seen-token mask, kept up to date as its tokens arrive
    engine = make_engine(tiny)
    penalized = SamplingParams(repetition_penalty=1.4)
    try:
        jobs = [run_request(engine, GenerationRequest(prompt=PROMPTS[i], max_new_tokens=24, ignore_eos=True,
                                                      sampling=penalized if i % 2 else SamplingParams()))
                for i in range(6)]  # fmt: skip
        outcomes = await asyncio.gather(*jobs)
    finally:
        engine.stop()
    for i, out in enumerate(outcomes):
        extra = {"repetition_penalty": 1.4} if i % 2 else {}
        assert_greedy(tiny, PROMPTS[i], out.tokens, reference_greedy(tiny, PROMPTS[i], 24, **extra), f"request {i}")
    assert outcomes[1].tokens != reference_greedy(tiny, PROMPTS[1], 24)  # the penalty changed something


async def seeded_text(model: LoadedModel, crowd: int) -> str:
    engine = make_engine(model)
    try:
        params = SamplingParams(do_sample=True, temperature=0.8, top_p=0.95, top_k=50, seed=1234)
        target = run_request(engine, GenerationRequest(prompt="The weather today", max_new_tokens=30,
                                                       sampling=params), delay=0.02)  # fmt: skip
        others = [
            run_request(engine, GenerationRequest(prompt=PROMPTS[i], max_new_tokens=10 + 5 * i,
                                                  sampling=SamplingParams(do_sample=True, temperature=1.3)))
            for i in range(crowd)
        ]  # fmt: skip
        out, *_ = await asyncio.gather(target, *others)
    finally:
        engine.stop()
    return out.sequences[0].text


async def test_tiny_seeded_sampling_same_alone_or_in_a_crowd(tiny: LoadedModel) -> None:
    alone = await seeded_text(tiny, 0)
    assert alone == await seeded_text(tiny, 6)
    assert alone  # it produced something


@pytest.mark.smollm
async def test_smollm_seeded_sampling_same_alone_or_in_a_crowd(smollm: LoadedModel) -> None:
    assert await seeded_text(smollm, 0) == await seeded_text(smollm, 5)


@pytest.mark.smollm
async def test_smollm_sibling_sequences_decode_from_the_prompt_kv(smollm: LoadedModel) -> None:
    # Near-zero temperature makes sampling argmax: every sibling (the first decodes from the slot its
    # prefill wrote, the others from copies of that row) must follow transformers' greedy output.
    engine = make_engine(smollm)
    params = SamplingParams(do_sample=True, temperature=1e-4, seed=1)
    try:
        out = await run_request(engine, GenerationRequest(prompt=PROMPTS[1], max_new_tokens=12, num_return_sequences=3,
                                                          sampling=params, ignore_eos=True))  # fmt: skip
    finally:
        engine.stop()
    expected = reference_greedy(smollm, PROMPTS[1], 12)
    assert [list(out.sequences[i].token_ids) for i in range(3)] == [expected] * 3


@pytest.mark.smollm
async def test_smollm_prefix_reuse_matches_generate(smollm: LoadedModel) -> None:
    # The second prompt starts with the whole first one: its prefill reads those K/V from the prefix cache.
    head = "A long shared instruction that many requests begin with, followed by their own question. " * 3
    engine = make_engine(smollm)
    try:
        await run_request(engine, GenerationRequest(prompt=head + "First:", max_new_tokens=1))
        # another prompt overwrites the batch's free slot, where the first one's K/V still lay
        await run_request(engine, GenerationRequest(prompt="Something else entirely. " * 12, max_new_tokens=1))
        out = await run_request(engine, GenerationRequest(prompt=head + "What is the capital of France?",
                                                          max_new_tokens=12, ignore_eos=True))  # fmt: skip
        reused = engine.prefix_cache.hit_tokens
    finally:
        engine.stop()
    assert reused > 40
    assert out.tokens == reference_greedy(smollm, head + "What is the capital of France?", 12)
