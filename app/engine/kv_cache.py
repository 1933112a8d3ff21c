"""A KV cache whose rows can join and leave between decode steps without touching the other rows.

Layout, per layer: preallocated buffers `k`, `v` of shape (row_capacity, kv_heads, len_capacity, head_dim).
Active rows are slots [0, rows). Every row ends at the same column `end` (the next token of every row is
written there), so rows are right-aligned: a row holding n tokens occupies columns [end - n, end). The
attention window is [start, end) with start = end - (longest row); columns left of a shorter row are
padding, masked out by the caller.

- join: a newcomer's prompt is prefilled straight into the next free slot, right-aligned (`open_row`,
  RowCache); its other sequences (num_return_sequences) copy that row.
- leave: the last active slot is copied into the freed one (one row's window, not the whole cache).
- decode: each layer writes one column at `end` in place; no concatenation of the whole cache per step.
The buffers are reshaped (amortised, by growing) only when a row needs more columns or rows than there
are.

Memory: with a token bound (`max_tokens`, the server's max_batch_tokens) the whole budget is one flat
arena per layer, allocated and touched once (`allocate`, at engine start); the (rows, H, len, D) buffers
are views into it, reshaped in place as the batch's geometry changes. The process's memory therefore
holds the configured KV budget from the start and never grows past it, and batches of every shape
coming and going do not fragment the heap (a soak of the default model grew RSS 62% while the cache was
allocated per geometry). Without a bound, buffers are allocated per geometry and dropped when idle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass(frozen=True)
class Layout:
    """One layer's K/V geometry, learnt from the first tensors the cache sees."""

    heads: int
    k_dim: int
    v_dim: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class Window:
    rows: int = 0  # active slots [0, rows)
    start: int = 0  # first column any active row uses
    end: int = 0  # the column the next decoded token is written to


class SlotLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, window: Window) -> None:
        super().__init__()
        self.window = window
        self.k: torch.Tensor | None = None  # (row_cap, H, len_cap, D)
        self.v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("SlotLayer buffers are allocated by SlotCache.reserve before the first step")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.k is not None and self.v is not None
        w = self.window
        q = key_states.shape[-2]
        self.k[: w.rows, :, w.end : w.end + q] = key_states
        self.v[: w.rows, :, w.end : w.end + q] = value_states
        # Views, not copies: (rows, H, window + q, D)
        return self.k[: w.rows, :, w.start : w.end + q], self.v[: w.rows, :, w.start : w.end + q]

    def get_seq_length(self) -> int:
        return self.window.end - self.window.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class RowLayer(CacheLayerMixin):
    """One layer of a prompt prefilled straight into its slot: keys/values are views (1, H, P, D) of the
    row's columns; the first `filled` already hold a reused prefix, each forward appends after them."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.filled = filled
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("RowLayer writes into views handed to it")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        n, q = self.filled, key_states.shape[-2]
        self.keys[:, :, n : n + q] = key_states
        self.values[:, :, n : n + q] = value_states
        self.filled = n + q
        return self.keys[:, :, : n + q], self.values[:, :, : n + q]  # (1, H, n + q, D)

    def get_seq_length(self) -> int:
        return self.filled

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.filled + query_length, 0

    def get_max_length(self) -> int:
        return -1


class RowCache(Cache):
    """What a prefill forward writes through: the K/V of its prompt land in the slot it will decode from,
    with no per-prompt buffers (an 8k-token prompt's K/V is 350 MB on SmolLM2) and no copy at join."""

    def __init__(self, views: list[tuple[torch.Tensor, torch.Tensor]], filled: int) -> None:
        super().__init__(layers=[RowLayer(k, v, filled) for k, v in views])


class SlotCache(Cache):
    def __init__(self, num_layers: int, max_rows: int, max_tokens: int | None = None) -> None:
        self.window = Window()
        self.max_rows = max_rows
        # Bound on rows x columns allocated (the buffers are rectangular): spare rows and headroom
        # columns are only added while they fit. The scheduler keeps rows x longest row within it.
        self.max_tokens = max_tokens
        self.slot_layers = [SlotLayer(self.window) for _ in range(num_layers)]
        # per layer flat (keys, values) storage the buffers are views of; None until `allocate`
        self.arena: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._layout: list[Layout] = []
        super().__init__(layers=list(self.slot_layers))

    def allocate(self, like: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Allocate the arena for `max_tokens` (plus one decode column per row), shaped like `like`
        ((B, H, n, D) per layer), unless it exists or there is no bound. Zero-filled: resident from now on."""
        if not self._layout:
            self._layout = [Layout(k.shape[1], k.shape[3], v.shape[3], k.dtype, k.device) for k, v in like]
        if self.arena is not None or self.max_tokens is None:
            return
        tokens = self.max_tokens + self.max_rows
        self.arena = [
            (k.new_zeros(tokens * k.shape[1] * k.shape[3]), v.new_zeros(tokens * v.shape[1] * v.shape[3]))
            for k, v in like
        ]

    @property
    def has_layout(self) -> bool:
        """Whether the cache has seen the model's K/V shapes (`allocate` or a first `reserve`)."""
        return bool(self._layout)

    def capacity_bytes(self) -> int:
        """Bytes the arena holds (0 without one)."""
        return sum(k.nbytes + v.nbytes for k, v in self.arena or [])

    # ---- geometry -----------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.window.rows

    @property
    def width(self) -> int:
        return self.window.end - self.window.start

    def _capacity(self) -> tuple[int, int]:
        k = self.slot_layers[0].k
        return (0, 0) if k is None else (k.shape[0], k.shape[2])

    def reserve(self, rows: int, longest: int, like: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Make room for `rows` active rows, each up to `longest` columns, plus one column to decode into.

        `like` gives (keys, values) per layer to copy shapes/dtype from when nothing is allocated yet.
        """
        row_cap, len_cap = self._capacity()
        w = self.window
        need_end = max(longest, w.end)
        if rows <= row_cap and need_end + 1 <= len_cap and w.end >= longest:
            return
        # Compact to the left edge: the window [start, end) moves to [new_end - width, new_end).
        width = self.width if w.rows else 0
        new_end = max(longest, width)
        headroom = max(64, new_end // 2)
        new_len_cap = max(len_cap, -(-(new_end + headroom) // 64) * 64)
        new_row_cap = max(row_cap, min(self.max_rows, max(rows, 2 * row_cap, 4)))
        new_row_cap = max(new_row_cap, rows)
        if self.max_tokens is not None:
            # rows first (they are what was asked for), then columns, never below what is needed
            new_row_cap = max(rows, min(new_row_cap, self.max_tokens // (new_end + 1)))
            new_len_cap = max(new_end + 1, min(new_len_cap, self.max_tokens // new_row_cap))
        if not self._layout:
            assert like is not None, "first reserve needs example tensors"
            self.allocate(like)
        if self.max_tokens is not None and new_row_cap * new_len_cap > self.max_tokens + self.max_rows:
            # the scheduler admits nothing that gets here; an error for this step, not a crash
            raise RuntimeError(f"KV cache bound exceeded: {rows} rows x {new_end + 1} columns > "
                               f"{self.max_tokens + self.max_rows} tokens")  # fmt: skip
        arena: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self._layout)
        if self.arena is not None:
            arena = list(self.arena)
        for layer, shape, flat in zip(self.slot_layers, self._layout, arena, strict=True):
            old: tuple[torch.Tensor, torch.Tensor] | None = None
            if layer.k is not None and layer.v is not None and w.rows and width:
                old = layer.k[: w.rows, :, w.start : w.end], layer.v[: w.rows, :, w.start : w.end]
            k_shape = (new_row_cap, shape.heads, new_len_cap, shape.k_dim)
            v_shape = (new_row_cap, shape.heads, new_len_cap, shape.v_dim)
            if flat is not None:
                if old is not None:  # the new views alias the old ones: move the live window out first
                    old = old[0].clone(), old[1].clone()
                new_k = flat[0][: math.prod(k_shape)].view(k_shape)
                new_v = flat[1][: math.prod(v_shape)].view(v_shape)
            else:
                new_k = torch.zeros(k_shape, dtype=shape.dtype, device=shape.device)
                new_v = torch.zeros(v_shape, dtype=shape.dtype, device=shape.device)
            if old is not None:
                new_k[: w.rows, :, new_end - width : new_end] = old[0]
                new_v[: w.rows, :, new_end - width : new_end] = old[1]
            layer.k, layer.v = new_k, new_v
        w.start, w.end = new_end - width, new_end

    # ---- rows ---------------------------------------------------------------------------------
    def open_row(self, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views (1, H, length, D) per layer of the next free slot's last `length` columns, for a prefill to
        write into (RowCache). The slot becomes active with `add_open_row`. Call `reserve` first."""
        w = self.window
        slot = w.rows
        views = []
        for layer in self.slot_layers:
            assert layer.k is not None and layer.v is not None
            views.append((layer.k[slot : slot + 1, :, w.end - length : w.end],
                          layer.v[slot : slot + 1, :, w.end - length : w.end]))  # fmt: skip
        return views

    def add_open_row(self, length: int) -> int:
        """Count the next free slot, whose last `length` columns a prefill filled (`open_row`), as active."""
        w = self.window
        slot = w.rows
        w.rows += 1
        w.start = min(w.start, w.end - length) if slot else w.end - length
        return slot

    def copy_row(self, src_slot: int, length: int) -> int:
        """A new slot holding the last `length` columns of active row `src_slot`. Call `reserve` first."""
        w = self.window
        slot = w.rows
        for layer in self.slot_layers:
            assert layer.k is not None and layer.v is not None
            layer.k[slot, :, w.end - length : w.end] = layer.k[src_slot, :, w.end - length : w.end]
            layer.v[slot, :, w.end - length : w.end] = layer.v[src_slot, :, w.end - length : w.end]
        return self.add_open_row(length)

    def remove_row(self, slot: int) -> int | None:
        """Free `slot`; the last active row moves into it. Returns the slot that moved (or None)."""
        w = self.window
        last = w.rows - 1
        moved = None
        if slot != last:
            for layer in self.slot_layers:
                assert layer.k is not None and layer.v is not None
                layer.k[slot, :, w.start : w.end] = layer.k[last, :, w.start : w.end]
                layer.v[slot, :, w.start : w.end] = layer.v[last, :, w.start : w.end]
            moved = last
        w.rows -= 1
        return moved

    def shrink_window(self, longest: int) -> None:
        """After rows left: the window only needs the longest remaining row."""
        w = self.window
        w.start = w.end - longest if w.rows else w.end

    def release(self) -> None:
        """With no rows left, drop the buffers: the next join starts a small geometry again. Without an
        arena their memory goes back (an idle server holds no KV memory); with one, the arena stays."""
        assert self.window.rows == 0
        for layer in self.slot_layers:
            layer.k = layer.v = None
        self.window.start = self.window.end = 0

    def advance(self, q: int = 1) -> None:
        """After a forward wrote q columns at `end` for every row."""
        self.window.end += q

    def nbytes(self) -> int:
        """Bytes the running batch's buffers span (rows x columns reserved), 0 when idle."""
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.slot_layers
                   if layer.k is not None and layer.v is not None)  # fmt: skip

    # transformers' Cache API the models call
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.width + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.width
