"""The prompt attention kernel (app/models/prompt_attention.py) computes causal attention as sdpa does, prompt by
prompt, and a prompt's rows are the same whatever other prompts share the call."""

from __future__ import annotations

import pytest
import torch

from app.models import prompt_attention

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
