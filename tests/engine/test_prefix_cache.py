"""Prefix cache: longest-common-prefix reuse of prompt K/V, its budget, and exact results through the engine."""

from __future__ import annotations

import pytest
import torch

from app.engine.prefix_cache import PrefixCache
from app.engine.types import GenerationRequest, RequestFinished, ScoreRequest, Scores
from app.models.loading.loader import LoadedModel
from tests.api.test_sentiment_api import direct_logprob
from tests.engine.helpers import make_engine, reference_greedy, run_request


def fake_kv(n: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # column j holds j, so a slice shows which positions it covers
    cols = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 4).contiguous()  # (1, H, n, D)
    return [(cols.clone(), cols.clone()) for _ in range(layers)]


def test_lookup_finds_the_longest_common_prefix_and_leaves_a_token() -> None:
    cache = PrefixCache(budget_bytes=10**6, min_tokens=8)
    a = list(range(100, 140))  # 40 tokens
    b = list(range(100, 120)) + list(range(500, 520))  # shares 20 with a
    cache.store(a, fake_kv(40))
    cache.store(b, fake_kv(40))
    n, kv = cache.lookup([*list(range(100, 130)), 7, 8])  # shares 30 with a
    assert n == 30 and kv is not None and kv[0][0].shape == (1, 2, 30, 4)
    assert kv[1][1][0, 0, :, 0].tolist() == list(range(30))
    n, _ = cache.lookup([*b[:25], 1, 2, 3])
    assert n == 25
    n, _ = cache.lookup(list(a))  # the whole prompt is kept; one token must still be computed
    assert n == 39
    assert cache.lookup([1] * 40) == (0, None)
    assert cache.lookup(a[:12] + [1] * 20)[0] == 12
    assert cache.lookup(a[:5] + [1] * 20) == (0, None)  # differs within the first KEY_TOKENS
    assert cache.hit_tokens == 30 + 25 + 39 + 12


def test_budget_evicts_least_recently_used_and_extensions_replace() -> None:
    per_entry = sum(k.nbytes + v.nbytes for k, v in fake_kv(20))
    cache = PrefixCache(budget_bytes=2 * per_entry, min_tokens=8, block_tokens=4)  # 10 blocks of 4 tokens
    first, second, third = ([i] * 8 + list(range(12)) for i in (1, 2, 3))
    cache.store(first, fake_kv(20))
    cache.store(second, fake_kv(20))
    assert cache.lookup([*first, 0])[0] == 20  # first is now the most recently used
    cache.store(third, fake_kv(20))
    assert len(cache) == 2 and cache.nbytes == 2 * per_entry
    assert cache.lookup([*second, 0]) == (0, None)
    assert cache.lookup([*first, 0])[0] == 20
    cache.store([*first, 5, 6, 7, 8], fake_kv(24))  # extends `first`: replaces it rather than adding
    # `first` went as redundant; 20 + 24 tokens are over the budget of 40, so `third` went too
    assert len(cache) == 1 and cache.lookup([*first, 5, 6, 7, 8, 9])[0] == 24
    assert PrefixCache(budget_bytes=0).lookup(first) == (0, None)


def test_index_tensors_live_on_the_pools_device_and_a_failed_copy_leaks_nothing() -> None:
    # the pool on another device than the CPU (meta stands in for CUDA: index_copy_ checks devices the same way)
    cache = PrefixCache(budget_bytes=10**5, min_tokens=8, block_tokens=4)
    meta = [(k.to("meta"), v.to("meta")) for k, v in fake_kv(20)]
    cache.store(list(range(20)), meta)
    assert len(cache) == 1
    hit = cache.match([*range(20), 0])
    assert hit is not None and hit.slots.device.type == "meta" and hit.gather()[0][0].shape == (1, 2, 20, 4)
    free = len(cache._free)
    with pytest.raises(RuntimeError):  # K/V of another layout: the copy into the pool fails
        cache.store(list(range(100, 120)), [(k[:, :1], v[:, :1]) for k, v in meta])
    assert len(cache._free) == free and len(cache) == 1
    for i in range(40):  # the pool goes on taking and evicting entries: none of its blocks was lost
        cache.store([i + 1] * 8 + list(range(12)), meta)
    assert len(cache._free) + sum(len(e.blocks) for e in cache._entries.values()) == cache.blocks


def test_pool_is_allocated_once_and_never_grows() -> None:
    cache = PrefixCache(budget_bytes=40 * 2 * 2 * 2 * 4 * 4, min_tokens=8, block_tokens=4)  # 40 tokens' K/V
    assert cache.capacity_bytes == 0
    cache.store([1, 2, 3], fake_kv(3))  # too short to keep, but the first prefill allocates the pool
    assert len(cache) == 0 and cache.blocks == 10 and cache.capacity_bytes == 40 * 2 * 2 * 2 * 4 * 4
    assert cache.nbytes == 0
    pool = cache._pool
    assert pool is not None
    pointers = [(k.data_ptr(), v.data_ptr()) for k, v in pool]
    for i in range(50):  # many prompts of many lengths come and go
        n = 8 + i % 23
        cache.store([i % 7 + 1] * 8 + list(range(i, i + n - 8)), fake_kv(n))
        assert cache.nbytes <= cache.capacity_bytes
    assert cache._pool is pool and [(k.data_ptr(), v.data_ptr()) for k, v in pool] == pointers
    # what comes back is still each token's own K/V
    last = [49 % 7 + 1] * 8 + list(range(49, 49 + 8 + 49 % 23 - 8))
    n, kv = cache.lookup([*last, 0])
    assert n == len(last) and kv is not None and kv[0][0][0, 1, :, 0].tolist() == list(range(n))
    # a prompt longer than the whole pool is not kept, and evicts nothing
    kept = len(cache)
    cache.store([9] * 8 + list(range(40)), fake_kv(48))
    assert len(cache) == kept


PREFIX = (
    "You are a careful assistant. Answer in one short sentence, in plain English, and do not repeat the "
    "question. Here are some examples of the style we want.\n"
)


async def test_shared_prefix_is_reused_and_greedy_output_is_unchanged(tiny: LoadedModel) -> None:
    engine = make_engine(tiny)
    try:
        prompts = [PREFIX + q for q in ("Q: Why is the sky blue?\nA:", "Q: What is a prime number?\nA:")]
        prompts.append(prompts[0])  # the same prompt again: all but its last token is reused
        prefix_tokens = len(tiny.tokenizer(PREFIX).input_ids)
        hits = []
        for prompt in prompts:
            before = engine.stats().prefix_hit_tokens
            out = await run_request(engine, GenerationRequest(prompt=prompt, max_new_tokens=12))
            assert out.tokens == reference_greedy(tiny, prompt, 12), prompt
            hits.append(engine.stats().prefix_hit_tokens - before)
        whole = len(tiny.tokenizer(prompts[0]).input_ids)
        assert hits[0] == 0 and prefix_tokens <= hits[1] < whole and hits[2] == whole - 1
    finally:
        engine.stop()


async def test_scoring_with_a_reused_prefix_matches_transformers(tiny: LoadedModel) -> None:
    engine = make_engine(tiny)
    try:
        ids = tiny.tokenizer(PREFIX + "Review: a fine film.\nSentiment:").input_ids
        labels = ((4633,), (3967, 13))  # " negative", " positive."
        results = []
        for _ in range(2):  # the second request takes its prompt's K/V from the cache
            events = [e async for e in await engine.submit(ScoreRequest(prompt=ids, continuations=labels))]
            assert isinstance(events[-1], RequestFinished)
            results.append(next(e for e in events if isinstance(e, Scores)).logprobs)
        assert engine.stats().prefix_hit_tokens == len(ids) - 1
        for got in results:
            for value, label in zip(got, labels, strict=True):
                assert value == pytest.approx(direct_logprob(tiny, ids, label), abs=1e-4)
    finally:
        engine.stop()
