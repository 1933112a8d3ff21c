"""The ragged KV cache: each row holds its own tokens in one segment of a shared arena, nothing padded.

Layout, per layer: one arena of blocks of BLOCK (16) tokens, head-major, K transposed within a block (what
the decode kernel reads fastest, app/models/ragged_attention.py):
    keys (H, NB, D, 16), values (H, NB, 16, D).
A row (a sequence) holds a `Segment`: consecutive blocks, enough for its prompt and its max new tokens,
taken when its prefill starts and given back when it leaves. Memory is therefore charged per row for what
that row may hold, not rows x the longest row: one 6,000-token prompt takes its own 375 blocks and the short
rows beside it take theirs. Segments are placed first-fit; when the free blocks are enough but no gap is,
the live segments slide left (`compact`, a copy of what is held, rare).

- prefill: a forward writes the prompt's K/V into its segment through `PrefillCache` (a transformers Cache);
  a chunk or a reused prefix reads back what the segment already holds.
- decode: `decode_view(segments, lengths)` gives the step's `DecodeView`: per layer it writes each row's new
  token into its segment and attends over that row's tokens only (the C kernel, or gathered windows on the
  torch path). Models without a written-out step run their own forward over `DecodeView.as_cache()`.

Memory: with a token bound (the server's max_batch_tokens) the arena is allocated and zero-filled once, at
engine start, so the process holds its KV budget from the start and never grows past it. Without a bound the
arena doubles when it is full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from app.models import ragged_attention
from app.models.attention import decode_attention

BLOCK = ragged_attention.BLOCK
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, H, P, D) keys and values


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK)


@dataclass(eq=False)
class Segment:
    """Blocks [start, start + blocks) of the arena; `start` moves when the cache compacts."""

    start: int
    blocks: int


class SegmentSpace:
    """Which blocks are held: segments kept in address order, placed first-fit. Torch-free."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.segments: list[Segment] = []  # by start

    @property
    def held(self) -> int:
        return sum(s.blocks for s in self.segments)

    def place(self, blocks: int) -> Segment | None:
        at = 0
        for i, seg in enumerate(self.segments):
            if seg.start - at >= blocks:
                placed = Segment(at, blocks)
                self.segments.insert(i, placed)
                return placed
            at = seg.start + seg.blocks
        if self.capacity - at >= blocks:
            placed = Segment(at, blocks)
            self.segments.append(placed)
            return placed
        return None

    def free(self, seg: Segment) -> None:
        self.segments.remove(seg)

    def compact(self) -> list[tuple[Segment, int]]:
        """Slide every segment left to close the gaps; returns (segment, its old start) for those that moved."""
        moved = []
        at = 0
        for seg in self.segments:
            if seg.start != at:
                moved.append((seg, seg.start))
                seg.start = at
            at += seg.blocks
        return moved


class RaggedCache:
    def __init__(self, num_layers: int, max_tokens: int | None, slack_tokens: int = 0,
                 kernel: bool | None = None) -> None:  # fmt: skip
        self.num_layers = num_layers
        # the arena holds max_tokens + slack_tokens tokens (the scheduler charges each row its reserved tokens
        # rounded up to a block, within max_tokens); None: no bound, it grows
        self.max_tokens = None if max_tokens is None else max_tokens + slack_tokens
        self.use_kernel = kernel  # None: where it builds and the shape allows; False: always the torch path
        self.kernel: ragged_attention.Kernel | None = None
        self.transposed = False  # keys (H, NB, D, 16) for the kernel; else (H, NB, 16, D) like the values
        self.keys: list[torch.Tensor] = []  # per layer (H, NB, D, 16)
        self.values: list[torch.Tensor] = []  # per layer (H, NB, 16, D)
        self._flat: list[tuple[torch.Tensor, torch.Tensor]] = []  # the bounded arena the views live in
        # per layer: heads, key dim, value dim, and 0-d tensors of the keys' and values' dtype and device
        self._layout: list[tuple[int, int, int, torch.Tensor, torch.Tensor]] = []
        self.space = SegmentSpace(0)

    # ---- memory -------------------------------------------------------------------------------
    @property
    def has_layout(self) -> bool:
        return bool(self.keys)

    def allocate(self, like: KV, q_heads: int | None = None) -> None:
        """Allocate the arena shaped like `like` ((B, H, n, D) per layer), zero-filled: resident from now on.
        `q_heads`: the model's query heads, for the decode kernel (built now, not in the first step); without
        it, or where the kernel cannot run, the torch path runs and keys are stored untransposed."""
        if self.keys:
            return
        k, v = like[0]
        heads, dim = k.shape[1], k.shape[3]
        if (self.use_kernel is not False and q_heads is not None and k.device.type == "cpu"
                and k.dtype == torch.float32 and v.shape[3] == dim and not q_heads % heads):  # fmt: skip
            self.kernel = ragged_attention.load(heads, q_heads // heads, dim)
        self.transposed = self.kernel is not None
        self._layout = [(k.shape[1], k.shape[3], v.shape[3], k.new_zeros(()), v.new_zeros(())) for k, v in like]
        tokens = self.max_tokens if self.max_tokens is not None else 64 * BLOCK
        self._grow(tokens // BLOCK)

    def _grow(self, blocks: int) -> None:
        keys, values, flat = [], [], []
        for i, (heads, k_dim, v_dim, k, v) in enumerate(self._layout):  # k, v: 0-d tensors of the dtype/device
            if self.max_tokens is not None:  # one flat arena, its bytes exactly the configured budget
                fk = k.new_zeros(self.max_tokens * heads * k_dim)
                fv = v.new_zeros(self.max_tokens * heads * v_dim)
                flat.append((fk, fv))
                nk = fk[: heads * blocks * k_dim * BLOCK].view(self._key_shape(heads, blocks, k_dim))
                nv = fv[: heads * blocks * BLOCK * v_dim].view(heads, blocks, BLOCK, v_dim)
            else:
                nk = k.new_zeros(self._key_shape(heads, blocks, k_dim))
                nv = v.new_zeros(heads, blocks, BLOCK, v_dim)
                if self.keys:
                    old = self.keys[i].shape[1]
                    nk[:, :old] = self.keys[i]
                    nv[:, :old] = self.values[i]
            keys.append(nk)
            values.append(nv)
        self.keys, self.values, self._flat = keys, values, flat
        self.space.capacity = blocks

    def _key_shape(self, heads: int, blocks: int, dim: int) -> tuple[int, int, int, int]:
        return (heads, blocks, dim, BLOCK) if self.transposed else (heads, blocks, BLOCK, dim)

    def capacity_bytes(self) -> int:
        """Bytes the bounded arena holds (0 without a bound)."""
        return sum(k.nbytes + v.nbytes for k, v in self._flat)

    def nbytes(self) -> int:
        """Bytes of the blocks rows hold now."""
        if not self.keys:
            return 0
        per_block = sum(k[:, :1].nbytes + v[:, :1].nbytes for k, v in zip(self.keys, self.values, strict=True))
        return self.space.held * per_block

    # ---- segments -----------------------------------------------------------------------------
    def hold(self, tokens: int) -> Segment:
        """A segment for `tokens` tokens. Raises RuntimeError when the arena cannot hold it (the scheduler
        admits nothing that gets here: an error for this step, not a crash)."""
        need = blocks_for(tokens)
        seg = self.space.place(need)
        if seg is None and self.space.capacity - self.space.held >= need:
            self._compact()
            seg = self.space.place(need)
        if seg is None and self.max_tokens is None:
            self._grow(max(2 * self.space.capacity, self.space.held + need))
            seg = self.space.place(need)
        if seg is None:
            raise RuntimeError(f"KV cache bound exceeded: {need} blocks asked, "
                               f"{self.space.capacity - self.space.held} of {self.space.capacity} free")  # fmt: skip
        return seg

    def drop(self, seg: Segment) -> None:
        self.space.free(seg)

    def drop_all(self) -> None:
        self.space.segments.clear()

    def _compact(self) -> None:
        for seg, old in self.space.compact():
            src, dst = slice(old, old + seg.blocks), slice(seg.start, seg.start + seg.blocks)
            overlap = old < seg.start + seg.blocks
            for k, v in zip(self.keys, self.values, strict=True):
                k[:, dst] = k[:, src].clone() if overlap else k[:, src]
                v[:, dst] = v[:, src].clone() if overlap else v[:, src]

    def copy(self, src: Segment, dst: Segment, tokens: int) -> None:
        """The first `tokens` tokens of `src` into `dst` (a sibling sequence of the same prompt)."""
        n = blocks_for(tokens)
        for k, v in zip(self.keys, self.values, strict=True):
            k[:, dst.start : dst.start + n] = k[:, src.start : src.start + n]
            v[:, dst.start : dst.start + n] = v[:, src.start : src.start + n]

    # ---- tokens -------------------------------------------------------------------------------
    def write(self, layer: int, seg: Segment, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens [pos, pos + q) of `seg` from k, v (1, H, q, D)."""
        p = torch.arange(pos, pos + k.shape[2], device=k.device)  # (q,)
        blk, slot = seg.start + p // BLOCK, p % BLOCK
        if self.transposed:
            self.keys[layer][:, blk, :, slot] = k[0].transpose(0, 1)  # (q, H, D)
        else:
            self.keys[layer][:, blk, slot, :] = k[0]  # (H, q, D)
        self.values[layer][:, blk, slot, :] = v[0]  # (H, q, D)

    def read(self, layer: int, seg: Segment, tokens: int, extra: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Tokens [0, tokens) of `seg`, contiguous copies (1, H, tokens, D); with `extra` (k, v (1, H, q, D)),
        followed by those: one copy of the prefix, not a read and a concatenation."""
        n = blocks_for(tokens)
        k = self.keys[layer][:, seg.start : seg.start + n]  # (H, n, D, 16) or (H, n, 16, D)
        v = self.values[layer][:, seg.start : seg.start + n]  # (H, n, 16, D)
        if self.transposed:
            k = k.transpose(2, 3)
        heads, more = k.shape[0], 0 if extra is None else extra[0].shape[2]
        keys = k.new_empty(1, heads, tokens + more, k.shape[3])
        values = v.new_empty(1, heads, tokens + more, v.shape[3])
        keys[0, :, :tokens] = k.reshape(heads, n * BLOCK, k.shape[3])[:, :tokens]
        values[0, :, :tokens] = v.reshape(heads, n * BLOCK, v.shape[3])[:, :tokens]
        if extra is not None:
            keys[:, :, tokens:] = extra[0]
            values[:, :, tokens:] = extra[1]
        return keys, values

    def read_all(self, seg: Segment, tokens: int) -> KV:
        return [self.read(layer, seg, tokens) for layer in range(self.num_layers)]

    def decode_view(self, segments: list[Segment], lengths: list[int]) -> DecodeView:
        """The step's view: rows hold `lengths` tokens each in `segments`; the new token goes after them."""
        return DecodeView(self, segments, lengths)


class DecodeView:
    """One decode step over the rows: write each row's new token, attend over its tokens."""

    def __init__(self, cache: RaggedCache, segments: list[Segment], lengths: list[int]) -> None:
        self.cache = cache
        device = cache.keys[0].device
        starts = torch.tensor([s.start for s in segments], device=device)  # (B,)
        held = torch.tensor(lengths, device=device)  # (B,)
        self.blk, self.slot = starts + held // BLOCK, held % BLOCK  # (B,): where each new token goes
        self.lengths = [n + 1 for n in lengths]
        self.starts = [s.start for s in segments]
        self.plan = ragged_attention.Plan(self.starts, self.lengths) if cache.kernel else None
        self._window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, H, 1, D): each row's new token."""
        if self.cache.transposed:
            self.cache.keys[layer][:, self.blk, :, self.slot] = k[:, :, 0]  # (B, H, D)
        else:
            self.cache.keys[layer][:, self.blk, self.slot, :] = k[:, :, 0].transpose(0, 1)  # (H, B, D)
        self.cache.values[layer][:, self.blk, self.slot, :] = v[:, :, 0].transpose(0, 1)  # (H, B, D)

    def window_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block and slot (B, W) of every column of right-aligned windows W = the longest row wide (padding:
        block 0), and the additive mask (B, 1, 1, W) over them."""
        if self._window is None:
            device = self.blk.device
            width = max(self.lengths)
            lengths = torch.tensor(self.lengths, device=device)  # (B,)
            pos = torch.arange(width, device=device).unsqueeze(0) - (width - lengths).unsqueeze(1)  # (B, W)
            real = pos >= 0
            pos = pos.clamp(min=0)
            starts = self.blk - (lengths - 1) // BLOCK  # (B,)
            blk = torch.where(real, starts.unsqueeze(1) + pos // BLOCK, 0)
            dtype = self.cache.keys[0].dtype
            mask = torch.where(real, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)
            self._window = blk, pos % BLOCK, mask[:, None, None, :]
        return self._window

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's tokens gathered into right-aligned padded windows, (B, H, W, D)."""
        blk, slot, _ = self.window_index()
        if self.cache.transposed:
            keys = self.cache.keys[layer][:, blk, :, slot].permute(0, 2, 1, 3)  # (B, W, H, D) -> (B, H, W, D)
        else:
            keys = self.cache.keys[layer][:, blk, slot, :].transpose(0, 1)  # (H, B, W, D) -> (B, H, W, D)
        values = self.cache.values[layer][:, blk, slot, :].transpose(0, 1)  # (H, B, W, D) -> (B, H, W, D)
        return keys, values

    def attend(self, layer: int, module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:  # fmt: skip
        """q (B, Hq, 1, D), the new k, v (B, Hkv, 1, D) -> attention output (B, 1, Hq, Dv), as sdpa returns."""
        kernel = self.cache.kernel
        if kernel is not None and self.plan is not None:  # the kernel stores the new token itself
            rows, heads, _, dim = q.shape
            out = kernel(q.reshape(rows, heads, dim).contiguous(), scale, self.cache.keys[layer],
                         self.cache.values[layer], k[:, :, 0].contiguous(), v[:, :, 0].contiguous(),
                         self.plan)  # (B, Hq, D)  # fmt: skip
            return out.view(rows, 1, heads, dim)
        self.append(layer, k, v)
        # the torch path: row by row over views of each segment (a padded window costs rows x the longest row)
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        heads, dim = keys.shape[0], values.shape[3]
        outs = []
        for row, (start, n) in enumerate(zip(self.starts, self.lengths, strict=True)):
            nb = -(-n // BLOCK)
            k = keys[:, start : start + nb].reshape(heads, nb * BLOCK, -1)[None, :, :n]  # (1, H, n, D)
            v = values[:, start : start + nb].reshape(heads, nb * BLOCK, dim)[None, :, :n]
            outs.append(decode_attention(module, q[row : row + 1], k, v, None, scaling=scale)[0])
        return torch.cat(outs)  # (B, 1, Hq, Dv)

    def as_cache(self) -> DecodeCache:
        return DecodeCache(self)


class _DecodeLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, view: DecodeView, index: int) -> None:
        super().__init__()
        self.view, self.index = view, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("decode layers write into the ragged cache")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        self.view.append(self.index, key_states, value_states)
        return self.view.window(self.index)  # (B, H, W, D)

    def get_seq_length(self) -> int:
        return max(self.view.lengths) - 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class DecodeCache(Cache):
    """A decode step through the model's own forward (the GPU, models without a written-out step): each layer
    appends its rows' new token and reads the gathered windows; the caller passes `window_index()`'s mask."""

    def __init__(self, view: DecodeView) -> None:
        super().__init__(layers=[_DecodeLayer(view, i) for i in range(view.cache.num_layers)])


class _PrefillLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: RaggedCache, index: int, seg: Segment, filled: int) -> None:
        super().__init__()
        self.cache, self.index, self.seg, self.filled = cache, index, seg, filled
        self.is_initialized = True
        self.keys: torch.Tensor | None = None  # (1, H, filled, D) after a forward: the prompt so far
        self.values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("prefill layers write into the ragged cache")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        n = self.filled
        self.cache.write(self.index, self.seg, n, key_states, value_states)
        if n:  # a chunk after earlier ones, or after a reused prefix: attend over all of it
            key_states, value_states = self.cache.read(self.index, self.seg, n, (key_states, value_states))
        self.filled = key_states.shape[2]
        self.keys, self.values = key_states, value_states
        return key_states, value_states  # (1, H, filled, D)

    def get_seq_length(self) -> int:
        return self.filled

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.filled + query_length, 0

    def get_max_length(self) -> int:
        return -1


class PrefillCache(Cache):
    """What a prompt's forward writes through: its K/V land in the row's segment, after the `filled` tokens the
    segment already holds. After the forward, `kv()` is the prompt so far, contiguous (for the prefix cache)."""

    def __init__(self, cache: RaggedCache, seg: Segment, filled: int) -> None:
        self.prefill_layers = [_PrefillLayer(cache, i, seg, filled) for i in range(cache.num_layers)]
        super().__init__(layers=list(self.prefill_layers))

    def kv(self) -> KV:
        out = []
        for layer in self.prefill_layers:
            assert layer.keys is not None and layer.values is not None
            out.append((layer.keys, layer.values))
        return out

