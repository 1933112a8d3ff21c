"""The prompt attention kernel (app/models/layers/prompt_attention.py) computes causal attention as sdpa does, prompt by
prompt, and a prompt's rows are the same whatever other prompts share the call."""

from __future__ import annotations

import pytest
import torch

from app.models.layers import prompt_attention

KERNEL = prompt_attention.load(3, 3, 64)  # SmolLM2's shape: 3 key-value heads x 3 query heads, 64 dims
pytestmark = pytest.mark.skipif(KERNEL is None, reason="the kernel does not build here")


@pytest.mark.parametrize("lengths", [[1], [2], [15], [16], [17], [48], [300], [110, 1, 57, 16, 33]])
def test_it_equals_sdpa(lengths: list[int]) -> None:
    assert KERNEL is not None
    torch.manual_seed(len(lengths) + sum(lengths))
    total = sum(lengths)
    q, k, v = torch.randn(total, 9, 64), torch.randn(total, 3, 64), torch.randn(total, 3, 64)
    got = KERNEL(q, k, v, lengths, 0.125)  # (T, Hq, D)
    expected = prompt_attention.reference(q, k, v, lengths, 0.125)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 2e-6


def test_a_prompt_alone_and_among_others_is_bit_identical() -> None:
    assert KERNEL is not None
    torch.manual_seed(0)
    lengths = [40, 73, 5]
    total = sum(lengths)
    q, k, v = torch.randn(total, 9, 64), torch.randn(total, 3, 64), torch.randn(total, 3, 64)
    together = KERNEL(q, k, v, lengths, 0.125)
    rows = slice(40, 113)
    alone = KERNEL(q[rows].contiguous(), k[rows].contiguous(), v[rows].contiguous(), [73], 0.125)
    assert torch.equal(together[rows], alone)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8], ids=["fp32", "bf16", "int8"])
@pytest.mark.parametrize(("held", "n"), [(16, 1), (20, 5), (37, 40), (300, 17)])
def test_after_held_tokens_it_reads_the_cache_in_place(kv_dtype: torch.dtype, held: int, n: int) -> None:
    """A pass of n tokens after `held` that a segment of the ragged cache holds: each token attends over the
    segment's tokens up to its own, as the cache holds them (bf16: rounded; int8: times each token's scale), read
    where they lie."""
    from app.engine.kv_cache import RaggedCache

    kernel = prompt_attention.load(3, 3, 64, kv_dtype)
    assert kernel is not None
    torch.manual_seed(held + n)
    cache = RaggedCache(1, 2048, kernel=True, kv_dtype=kv_dtype)
    cache.allocate([(torch.zeros(1, 3, 1, 64), torch.zeros(1, 3, 1, 64))], q_heads=9)
    if cache.kernel is None:
        pytest.skip("the cache's kernel layout needs the ragged decode kernel")
    cache.hold(48)  # the prompt's segment does not start at block 0
    seg = cache.hold(held + n)
    k, v = torch.randn(1, 3, held + n, 64), torch.randn(1, 3, held + n, 64)
    cache.write(0, seg, 0, k, v)
    q = torch.randn(n, 9, 64)
    got = kernel.cached(q, cache.keys[0], cache.values[0], [(seg.start, held, n)], 0.125)  # (n, Hq, D)
    keys, values = cache.read(0, seg, held + n)  # (1, H, held + n, D), as the cache holds them
    mask = torch.arange(held + n)[None, :] <= torch.arange(held, held + n)[:, None]  # (n, held + n)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    expected = sdpa(q.transpose(0, 1)[None], keys, values, attn_mask=mask, scale=0.125, enable_gqa=True)
    expected = expected[0].transpose(0, 1)  # (n, Hq, D)
    assert (got - expected).abs().max() <= 2e-6
