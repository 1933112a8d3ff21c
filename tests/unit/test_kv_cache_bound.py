"""The slot cache never allocates more than its rows x columns bound."""

from __future__ import annotations

import torch

from app.engine.kv_cache import SlotCache


def kv(rows: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(rows, 2, length, 4), torch.zeros(rows, 2, length, 4)) for _ in range(3)]


def test_capacity_stays_within_the_token_bound() -> None:
    cache = SlotCache(num_layers=3, max_rows=32, max_tokens=1024)
    cache.reserve(1, 500, like=kv(1, 500))
    cache.add_row(kv(1, 500), 0, 500)
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
