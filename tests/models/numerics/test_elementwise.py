"""The C elementwise ops (app/models/numerics/elementwise.py): a row's result does not depend on how many rows share the
call (rows split over threads from a few rows on), and the greedy pick equals torch.argmax."""

from __future__ import annotations

import pytest
import torch

from app.engine.sampling import greedy
from app.models.numerics import elementwise


@pytest.fixture(scope="module")
def ops() -> elementwise.Elementwise:
    built = elementwise.load()
    if built is None:
        pytest.skip("the elementwise kernels do not build here")
    return built


def test_rows_split_over_threads_equal_rows_alone(ops: elementwise.Elementwise) -> None:
    torch.manual_seed(0)
    rows = 37  # past the parallel threshold, not a multiple of the threads
    x, r, w = torch.randn(rows, 576), torch.randn(rows, 576), torch.randn(576)
    g, y = torch.randn(rows, 2 * 1536) * 4, torch.randn(rows, (9 + 2 * 3) * 64)
    cos, sin = torch.randn(rows, 64), torch.randn(rows, 64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together_x = x.clone()
        together = (ops.add_rms_norm(together_x, r, w, 1e-5), ops.silu_mul(g), *ops.rope_split(y, cos, sin, 9, 3, 64))
        for i in range(rows):
            alone_x = x[i : i + 1].clone()
            alone = (ops.add_rms_norm(alone_x, r[i : i + 1], w, 1e-5), ops.silu_mul(g[i : i + 1]),
                     *ops.rope_split(y[i : i + 1], cos[i : i + 1], sin[i : i + 1], 9, 3, 64))  # fmt: skip
            assert torch.equal(alone_x[0], together_x[i])  # the residual, updated in place
            for a, t in zip(alone, together, strict=True):
                assert torch.equal(a[0], t[i])
    finally:
        torch.set_num_threads(before)
    # and the ops compute what they say (to float rounding: -ffast-math reorders the sums)
    mean = (x + r).pow(2).mean(-1, keepdim=True)
    assert torch.allclose(together[0], (x + r) * torch.rsqrt(mean + 1e-5) * w, rtol=1e-5, atol=1e-5)
    assert torch.allclose(together[1], torch.nn.functional.silu(g[:, :1536]) * g[:, 1536:], rtol=1e-5, atol=1e-5)


def test_gpt2_ops_compute_torch_s_and_split_rows_alike(ops: elementwise.Elementwise) -> None:
    """LayerNorm after the residual, GELU's tanh form and the unrotated q/k/v split (GPT-2's block): torch's values
    to float rounding, and each row's result the same alone and among 37."""
    torch.manual_seed(0)
    rows, width = 37, 768
    x, r, w, b = torch.randn(rows, width) + 3, torch.randn(rows, width), torch.randn(width), torch.randn(width)
    y, qkv = torch.randn(rows, 3072) * 3, torch.randn(rows, 3 * width)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together_x = x.clone()
        h = ops.add_layer_norm(together_x, r, w, b, 1e-5)
        g = ops.gelu(y.clone())
        q, k, v = ops.rope_split(qkv, None, None, 12, 12, 64)
        for i in range(rows):
            alone_x = x[i : i + 1].clone()
            assert torch.equal(ops.add_layer_norm(alone_x, r[i : i + 1], w, b, 1e-5)[0], h[i])
            assert torch.equal(alone_x[0], together_x[i])
            assert torch.equal(ops.gelu(y[i : i + 1].clone())[0], g[i])
    finally:
        torch.set_num_threads(before)
    expected = torch.nn.functional.layer_norm(x + r, (width,), w, b, 1e-5)
    assert torch.allclose(h, expected, rtol=1e-4, atol=1e-4)
    assert torch.allclose(g, torch.nn.functional.gelu(y, approximate="tanh"), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([q, k, v], dim=1), qkv.view(rows, 36, 64))  # copies, in order


@pytest.mark.parametrize("shape", [(1, 49152), (32, 49152), (5, 17)])
def test_greedy_is_torch_argmax_ties_to_the_first(ops: elementwise.Elementwise, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    x[0, 3] = x[0, shape[1] - 1] = 50.0  # a tie: the first index wins, as in torch
    if shape[0] > 1:
        x[-1, :] = -1.0  # a row with one value above a constant: its index
        x[-1, shape[1] - 1] = -0.5
    assert torch.equal(ops.argmax(x), x.argmax(dim=-1))
    assert torch.equal(greedy(x), x.argmax(dim=-1))
    assert greedy(x).dtype == torch.int64 and ops.argmax(x)[0].item() == 3
