"""The ragged KV cache: each row holds its own tokens in one segment of a shared arena, nothing padded.

Layout, per layer: one arena of blocks of BLOCK (16) tokens, head-major, K transposed within a block (what
the decode kernel reads fastest, app/models/layers/ragged_attention.py):
    keys (H, NB, D, 16), values (H, NB, 16, D);
with int8 K/V (the kernels only) each head's block is one run of bytes, its 16 tokens' int8 values (keys
transposed) then their 16 fp32 scales: keys and values (H, NB, D * 16 + 64) int8.
A row (a sequence) holds a `Segment`: consecutive blocks, enough for its prompt and its max new tokens,
taken when its prefill starts and given back when it leaves. Memory is therefore charged per row for what
that row may hold, not rows x the longest row: one 6,000-token prompt takes its own 375 blocks and the short
rows beside it take theirs. Segments are placed first-fit; when the free blocks are enough but no gap is,
the live segments slide left (`compact`, a copy of what is held, rare).

What forward passes see of it (app/engine/kv_views.py): a prompt's forward writes its K/V into its segment
through `PrefillCache` (a chunk or a reused prefix reads back what the segment already holds); a decode step's
`DecodeView` writes each row's new token and attends over that row's tokens only (the C kernel, or the torch
path); models without a written-out step run their own forward over `DecodeView.as_cache()`.

Memory: with a token bound (the server's max_batch_tokens) the arena is allocated and zero-filled once, at
engine start, so the process holds its KV budget from the start and never grows past it. Without a bound the
arena doubles when it is full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from app.models.layers import ragged_attention
from app.models.numerics import modes

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


def token_bytes(model: Any, setting: str = "auto") -> int:
    """Bytes one token takes in the KV cache of `model` under TEXTGEN_KV_CACHE_DTYPE `setting` (int8: a byte an element
    and a fp32 scale per head), from its config; 0 where the config does not say."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and dim):
        return 0
    dtype = modes.kv_cache_dtype(model, setting) or next(model.parameters()).dtype
    per_head = dim + 4 if dtype == torch.int8 else dim * dtype.itemsize
    return int(2 * layers * kv_heads * per_head)


class RaggedCache:
    def __init__(self, num_layers: int, max_tokens: int | None, slack_tokens: int = 0,
                 kernel: bool | None = None, kv_dtype: torch.dtype | None = None) -> None:  # fmt: skip
        self.num_layers = num_layers
        # the arena holds max_tokens + slack_tokens tokens (the scheduler charges each row its reserved tokens
        # rounded up to a block, within max_tokens); None: no bound, it grows
        self.max_tokens = None if max_tokens is None else max_tokens + slack_tokens
        self.use_kernel = kernel  # None: where it builds and the shape allows; False: always the torch path
        self.kernel: ragged_attention.DecodeAttentionKernel | None = None
        self.transposed = False  # keys (H, NB, D, 16) for the kernel; else (H, NB, 16, D) like the values
        # what the arena stores: `kv_dtype` (bf16: half the bytes a decode step reads) where the kernel runs,
        # else the model's own K/V dtype, `compute`, which reads hand back
        self.kv_dtype = kv_dtype
        self.store: torch.dtype = torch.float32
        self.compute: torch.dtype = torch.float32
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
        # bf16 or int8 storage from fp32 K/V, through the kernels only
        narrow = self.kv_dtype in (torch.bfloat16, torch.int8) and k.dtype == torch.float32
        want = self.kv_dtype if narrow and self.kv_dtype is not None else torch.float32
        if (self.use_kernel is not False and q_heads is not None and k.device.type == "cpu"
                and k.dtype == torch.float32 and v.shape[3] == dim and not q_heads % heads):  # fmt: skip
            self.kernel = ragged_attention.load(heads, q_heads // heads, dim, want)
        self.transposed = self.kernel is not None
        self.compute = k.dtype
        self.store = want if self.kernel is not None else k.dtype
        self._layout = [(k.shape[1], k.shape[3], v.shape[3], k.new_zeros((), dtype=self.store),
                         v.new_zeros((), dtype=self.store)) for k, v in like]  # fmt: skip
        tokens = self.max_tokens if self.max_tokens is not None else 64 * BLOCK
        self._grow(tokens // BLOCK)

    def _grow(self, blocks: int) -> None:
        keys, values, flat = [], [], []
        for i, (heads, k_dim, v_dim, k, v) in enumerate(self._layout):  # k, v: 0-d tensors of the dtype/device
            if self.max_tokens is not None:  # one flat arena, its bytes exactly the configured budget
                fk = k.new_zeros(self._flat_size(heads, k_dim))
                fv = v.new_zeros(self._flat_size(heads, v_dim))
                flat.append((fk, fv))
                nk = fk[: heads * blocks * self._block(k_dim)].view(self._key_shape(heads, blocks, k_dim))
                nv = fv[: heads * blocks * self._block(v_dim)].view(self._value_shape(heads, blocks, v_dim))
            else:
                nk = k.new_zeros(self._key_shape(heads, blocks, k_dim))
                nv = v.new_zeros(self._value_shape(heads, blocks, v_dim))
                if self.keys:
                    old = self.keys[i].shape[1]
                    nk[:, :old] = self.keys[i]
                    nv[:, :old] = self.values[i]
            keys.append(nk)
            values.append(nv)
        self.keys, self.values, self._flat = keys, values, flat
        self.space.capacity = blocks

    def _block(self, dim: int) -> int:
        """Elements of one head's block."""
        return ragged_attention.block_elements(self.store, dim)

    def _flat_size(self, heads: int, dim: int) -> int:
        """Elements of the bounded arena for one of K, V (int8: whole blocks, each with its scales)."""
        assert self.max_tokens is not None
        if self.store == torch.int8:
            return blocks_for(self.max_tokens) * heads * self._block(dim)
        return self.max_tokens * heads * dim

    def _key_shape(self, heads: int, blocks: int, dim: int) -> tuple[int, ...]:
        if self.store == torch.int8:
            return heads, blocks, self._block(dim)
        return (heads, blocks, dim, BLOCK) if self.transposed else (heads, blocks, BLOCK, dim)

    def _value_shape(self, heads: int, blocks: int, dim: int) -> tuple[int, ...]:
        return (heads, blocks, self._block(dim)) if self.store == torch.int8 else (heads, blocks, BLOCK, dim)

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
    @staticmethod
    def slots(seg: Segment, pos: int, tokens: int,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Block and slot (q,) of tokens [pos, pos + q) of `seg`."""
        p = torch.arange(pos, pos + tokens, device=device)  # (q,)
        return seg.start + p // BLOCK, p % BLOCK

    def put(self, layer: int, blk: torch.Tensor, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens at blocks and slots (T,) (of any segments) from k, v (T, H, D)."""
        if self.kernel is not None:  # the kernel stores (and, into int8, quantizes) what it is handed as it expects
            self.kernel.put(self.keys[layer], self.values[layer], blk.to(torch.int64).contiguous(),
                            slot.to(torch.int64).contiguous(), k.to(torch.float32).contiguous(),
                            v.to(torch.float32).contiguous())  # fmt: skip
            return
        k, v = k.to(self.store), v.to(self.store)
        if self.transposed:
            self.keys[layer][:, blk, :, slot] = k  # (T, H, D)
        else:
            self.keys[layer][:, blk, slot, :] = k.transpose(0, 1)  # (H, T, D)
        self.values[layer][:, blk, slot, :] = v.transpose(0, 1)  # (H, T, D)

    def write(self, layer: int, seg: Segment, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens [pos, pos + q) of `seg` from k, v (1, H, q, D)."""
        blk, slot = self.slots(seg, pos, k.shape[2], k.device)
        self.put(layer, blk, slot, k[0].transpose(0, 1), v[0].transpose(0, 1))

    def read(self, layer: int, seg: Segment, tokens: int, extra: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Tokens [0, tokens) of `seg`, contiguous copies (1, H, tokens, D); with `extra` (k, v (1, H, q, D)),
        followed by those: one copy of the prefix, not a read and a concatenation."""
        heads, k_dim, v_dim = self._layout[layer][:3]
        n = blocks_for(tokens)
        if self.store == torch.int8:  # int8 x scale, the segment's blocks at once
            k = self._dequantize(self.keys[layer][:, seg.start : seg.start + n], k_dim, True)[:, :tokens]
            v = self._dequantize(self.values[layer][:, seg.start : seg.start + n], v_dim, False)[:, :tokens]
        else:
            kb = self.keys[layer][:, seg.start : seg.start + n]  # (H, n, D, 16) or (H, n, 16, D)
            vb = self.values[layer][:, seg.start : seg.start + n]  # (H, n, 16, D)
            if self.transposed:
                kb = kb.transpose(2, 3)
            k = kb.reshape(heads, n * BLOCK, kb.shape[3])[:, :tokens]  # (H, tokens, D)
            v = vb.reshape(heads, n * BLOCK, vb.shape[3])[:, :tokens]
        more = 0 if extra is None else extra[0].shape[2]
        keys = k.new_empty(1, heads, tokens + more, k.shape[2], dtype=self.compute)
        values = v.new_empty(1, heads, tokens + more, v.shape[2], dtype=self.compute)
        keys[0, :, :tokens] = k
        values[0, :, :tokens] = v
        if extra is not None:
            keys[:, :, tokens:] = extra[0]
            values[:, :, tokens:] = extra[1]
        return keys, values

    @staticmethod
    def _dequantize(blocks: torch.Tensor, dim: int, keys: bool) -> torch.Tensor:
        """An int8 arena's consecutive blocks (H, n, D * 16 + 64) -> their tokens (H, n * 16, D) fp32: each
        int8 x its token's scale, the product `gather` computes."""
        heads, n = blocks.shape[:2]
        scales = blocks[..., dim * BLOCK :].contiguous().view(torch.float32)  # (H, n, 16)
        u = blocks[..., : dim * BLOCK]  # (H, n, D * 16)
        if keys:  # transposed within the block
            x = (u.reshape(heads, n, dim, BLOCK).to(torch.float32) * scales[:, :, None, :]).transpose(2, 3)
        else:
            x = u.reshape(heads, n, BLOCK, dim).to(torch.float32) * scales[..., None]
        return x.reshape(heads, n * BLOCK, dim)

    def gather(self, layer: int, blk: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An int8 arena's tokens at blocks and slots (B, W) as `compute` floats, keys and values (B, H, W, D):
        int8 x the token's scale, the product `_dequantize` computes for `read`'s whole segments (3x as fast
        there: a 120-token read_all of 30 layers of 3 heads, 3.2-4.3 ms against 8.9-11.8 through here). For the
        torch path of the layers the kernel does not run (Gemma's sliding window)."""
        heads, k_dim, v_dim = self._layout[layer][:3]
        out = []
        for arena, dim, keys in ((self.keys[layer], k_dim, True), (self.values[layer], v_dim, False)):
            d = torch.arange(dim, device=arena.device)
            inner = d * BLOCK + slot[..., None] if keys else slot[..., None] * dim + d  # (B, W, D): in the block
            u = arena.view(heads, -1)[:, blk[..., None] * arena.shape[2] + inner]  # (H, B, W, D)
            scales = arena.view(torch.float32)[..., dim * BLOCK // 4 :][:, blk, slot]  # (H, B, W)
            out.append((u.to(torch.float32) * scales[..., None]).transpose(0, 1).to(self.compute))
        return out[0], out[1]

    def read_all(self, seg: Segment, tokens: int) -> KV:
        return [self.read(layer, seg, tokens) for layer in range(self.num_layers)]
