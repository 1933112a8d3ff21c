"""The slot cache never allocates more than its rows x columns bound."""

from __future__ import annotations

import pytest
import torch

from app.engine.kv_cache import SlotCache


def kv(rows: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(rows, 2, length, 4), torch.zeros(rows, 2, length, 4)) for _ in range(3)]


def put(cache: SlotCache, src: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> int:
    """What a prefill does: write a row's K/V into the next free slot, then count it."""
    for (dest_k, dest_v), (k, v) in zip(cache.open_row(length), src, strict=True):
        dest_k.copy_(k[:1, :, -length:])
        dest_v.copy_(v[:1, :, -length:])
    return cache.add_open_row(length)


def test_capacity_stays_within_the_token_bound() -> None:
    cache = SlotCache(num_layers=3, max_rows=32, max_tokens=1024)
    cache.reserve(1, 500, like=kv(1, 500))
    put(cache, kv(1, 500), 500)
    rows, cols = cache._capacity()
    assert rows * cols <= 1024 and cols >= 501  # headroom and spare rows only where they fit
    cache.reserve(2, 500)
    rows, cols = cache._capacity()
    assert rows >= 2 and rows * cols <= 1024
    cache.remove_row(0)
    cache.release()
    assert cache.nbytes() == 0
    for n in range(1, 33):  # many short rows: up to the row limit, columns shrink to fit
        cache.reserve(n, 20, like=kv(1, 20))
        rows, cols = cache._capacity()
        assert rows >= n and cols >= 21 and rows * cols <= 1024
    unbounded = SlotCache(num_layers=3, max_rows=32)
    unbounded.reserve(1, 500, like=kv(1, 500))
    assert unbounded._capacity()[1] >= 750  # without a bound: 50% headroom


def row_kv(value: float, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One prefilled row whose K holds `value` + column index, V its negation: (1, 2, length, 4) per layer."""
    cols = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).expand(1, 2, length, 4)
    return [(value + cols, -(value + cols)) for _ in range(3)]


def test_bounded_cache_lives_in_one_arena_and_keeps_rows_across_reshapes() -> None:
    cache = SlotCache(num_layers=3, max_rows=8, max_tokens=512)
    cache.allocate(kv(1, 1))
    capacity = cache.capacity_bytes()
    assert capacity == 3 * 2 * (512 + 8) * 2 * 4 * 4  # layers x (K, V) x tokens x heads x dim x fp32
    arena_ptrs = [k.data_ptr() for k, _ in cache.arena or []]
    lengths = {100.0: 10, 200.0: 30, 300.0: 5, 400.0: 60, 500.0: 41}
    for value, length in lengths.items():  # every join with a longer row reshapes the views
        cache.reserve(cache.rows + 1, length)
        put(cache, row_kv(value, length), length)
    cache.remove_row(1)  # the last row (500) moves into slot 1
    order = [100.0, 500.0, 300.0, 400.0]
    cache.shrink_window(max(lengths[v] for v in order))
    cache.reserve(4, 120)  # needs more columns: reshaped again, with live rows
    w = cache.window
    for layer, ptr in zip(cache.slot_layers, arena_ptrs, strict=True):
        assert layer.k is not None and layer.v is not None
        assert layer.k.data_ptr() == ptr  # a view of the arena, never a new allocation
        for slot, value in enumerate(order):
            n = lengths[value]
            expected = value + torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(2, n, 4)
            assert torch.equal(layer.k[slot, :, w.end - n : w.end], expected)
            assert torch.equal(layer.v[slot, :, w.end - n : w.end], -expected)
    assert cache.nbytes() > 0
    for slot in range(3, -1, -1):
        cache.remove_row(slot)
    cache.release()
    assert cache.nbytes() == 0 and cache.capacity_bytes() == capacity  # the arena stays, nothing spans it


def test_a_geometry_over_the_bound_is_an_error_not_a_crash() -> None:
    cache = SlotCache(num_layers=3, max_rows=8, max_tokens=512)
    cache.reserve(1, 10, like=kv(1, 1))
    with pytest.raises(RuntimeError, match="KV cache bound exceeded"):
        cache.reserve(4, 200)
