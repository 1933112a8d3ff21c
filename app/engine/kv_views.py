"""What a forward pass sees of the ragged KV cache (app/engine/kv_cache.py).

- `DecodeView`: one decode step over the batch's rows. Per layer, `attend` stores each row's new token in its
  segment and returns the attention over that row's own tokens: the C kernel (app/models/layers/ragged_attention.py)
  where it runs, else row by row over views of each segment. `window` gathers right-aligned padded windows
  for a model's own forward (`as_cache`, with `window_index`'s mask).
- `PrefillCache`: a transformers Cache a prompt's forward writes through, into its segment.
- `PromptView`: several prompts in one written-out pass (app/models/layers/decode_step.LlamaStep.prefill): per layer,
  `attend` stores every prompt token's K/V in its prompt's segment and returns each prompt's causal attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional
from transformers.cache_utils import Cache, CacheLayerMixin

from app.engine.kv_cache import BLOCK, KV, RaggedCache, Segment, blocks_for
from app.models.layers import native_step, prompt_attention, ragged_attention
from app.models.layers.attention import decode_attention


class DecodeView:
    """One decode step over the rows: write each row's new token, attend over its tokens."""

    def __init__(self, cache: RaggedCache, segments: list[Segment], lengths: list[int]) -> None:
        self.cache = cache
        self.starts = [s.start for s in segments]
        self.lengths = [n + 1 for n in lengths]  # with the new token
        # the kernel's split of the rows into jobs; it stores the new tokens itself
        self.plan = ragged_attention.DecodeJobs(self.starts, self.lengths) if cache.kernel else None
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None
        self._window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._distance: torch.Tensor | None = None  # (B, W): how far back each window column is

    def _new_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Block and slot (B,) each row's new token goes to (the torch paths; the kernel has its own)."""
        if self._slots is None:
            device = self.cache.keys[0].device
            starts = torch.tensor(self.starts, device=device)  # (B,)
            held = torch.tensor(self.lengths, device=device) - 1  # (B,)
            self._slots = starts + held // BLOCK, held % BLOCK
        return self._slots

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, H, 1, D): each row's new token."""
        blk, slot = self._new_slots()
        self.cache.put(layer, blk, slot, k[:, :, 0], v[:, :, 0])  # (B, H, D) each

    def window_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block and slot (B, W) of every column of right-aligned windows W = the longest row wide (padding:
        block 0), and the additive mask (B, 1, 1, W) over them."""
        if self._window is None:
            device = self.cache.keys[0].device
            width = max(self.lengths)
            lengths = torch.tensor(self.lengths, device=device)  # (B,)
            pos = torch.arange(width, device=device).unsqueeze(0) - (width - lengths).unsqueeze(1)  # (B, W)
            real = pos >= 0
            pos = pos.clamp(min=0)
            starts = torch.tensor(self.starts, device=device)  # (B,)
            blk = torch.where(real, starts.unsqueeze(1) + pos // BLOCK, 0)
            dtype = self.cache.compute
            mask = torch.where(real, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)
            self._window = blk, pos % BLOCK, mask[:, None, None, :]
            self._distance = torch.where(real, lengths.unsqueeze(1) - 1 - pos, width)  # (B, W): back from the new token
        return self._window

    def sliding_mask(self, window: int) -> torch.Tensor:
        """`window_index`'s mask for the layers that attend within a sliding window (Gemma's): each row's new
        token sees its last `window` tokens, itself included, as transformers' sliding window does."""
        mask = self.window_index()[2]  # (B, 1, 1, W)
        assert self._distance is not None
        far = (self._distance >= window)[:, None, None, :]  # (B, 1, 1, W)
        return mask.masked_fill(far, torch.finfo(mask.dtype).min)

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's tokens gathered into right-aligned padded windows, (B, H, W, D)."""
        blk, slot, _ = self.window_index()
        if self.cache.store == torch.int8:
            return self.cache.gather(layer, blk, slot)
        if self.cache.transposed:
            keys = self.cache.keys[layer][:, blk, :, slot].permute(0, 2, 1, 3)  # (B, W, H, D) -> (B, H, W, D)
        else:
            keys = self.cache.keys[layer][:, blk, slot, :].transpose(0, 1)  # (H, B, W, D) -> (B, H, W, D)
        values = self.cache.values[layer][:, blk, slot, :].transpose(0, 1)  # (H, B, W, D) -> (B, H, W, D)
        return keys.to(self.cache.compute), values.to(self.cache.compute)

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
            nb = blocks_for(n)
            row_k = keys[:, start : start + nb].reshape(heads, nb * BLOCK, -1)[None, :, :n]  # (1, H, n, D)
            row_v = values[:, start : start + nb].reshape(heads, nb * BLOCK, dim)[None, :, :n]
            outs.append(decode_attention(module, q[row : row + 1], row_k, row_v, None, scaling=scale)[0])
        return torch.cat(outs)  # (B, 1, Hq, Dv)

    def ragged(self) -> native_step.Ragged | None:
        """The C kernel, this step's plan and the arena's K/V per layer, for a step that runs its layers in C
        (app/models/layers/native_step.py); None on the torch path."""
        kernel = self.cache.kernel
        if kernel is None or self.plan is None:
            return None
        return kernel, self.plan, self.cache.keys, self.cache.values

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



class PromptView:
    """Prompts computed in one pass, one after another in its rows: prompt p's `n` tokens go to positions
    [filled, filled + n) of its segment (`filled`: what the segment already holds, a reused prefix or earlier
    chunks). Attention is per prompt, over its own tokens only: a prompt from its first token attends over its
    K/V as computed (as the model's forward does); one after held tokens over its segment as the cache holds
    it (the kernel reads it in place; the torch path reads it back, as a `PrefillCache` does)."""

    def __init__(self, cache: RaggedCache, prompts: list[tuple[Segment, int, int]], device: torch.device,
                 kernel: prompt_attention.PromptAttentionKernel | None = None) -> None:  # fmt: skip
        """prompts: (segment, filled, n) each; `kernel`: the prompt attention kernel (None: sdpa)."""
        self.cache = cache
        self.prompts = prompts
        self.kernel = kernel
        self.fresh = all(filled == 0 for _, filled, _ in prompts)  # then one kernel call for all of them
        where = [cache.slots(seg, filled, n, device) for seg, filled, n in prompts]
        self.blk, self.slot = torch.cat([b for b, _ in where]), torch.cat([s for _, s in where])  # (T,) each
        self.positions = torch.cat([torch.arange(filled, filled + n, device=device) for _, filled, n in prompts])
        self.offsets = [0]  # prompt p's rows: [offsets[p], offsets[p + 1])
        for _, _, n in prompts:
            self.offsets.append(self.offsets[-1] + n)
        # the torch path after what the segment holds: query i (position filled + i) sees keys [0, filled + i]
        self.masks = [None if filled == 0 or kernel is not None else torch.arange(filled + n, device=device)[None, :]
                      <= torch.arange(filled, filled + n, device=device)[:, None]
                      for _, filled, n in prompts]  # fmt: skip
        # per prompt from its first token, per layer (1, H, n, D): its K/V (the others' are in their segments)
        self.kv: list[KV] = [[] for _ in prompts]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q (T, Hq, D), k, v (T, Hkv, D) -> attention output (T, Hq, D)."""
        self.cache.put(layer, self.blk, self.slot, k, v)
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        kernel = self.kernel
        together = kernel is not None and self.fresh  # every prompt from its first token: one call
        out = kernel(q, k, v, [n for _, _, n in self.prompts], scale) if together else torch.empty_like(q)  # type: ignore[misc]
        for p, ((seg, filled, n), mask) in enumerate(zip(self.prompts, self.masks, strict=True)):
            a, b = self.offsets[p], self.offsets[p + 1]
            pk, pv = k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None]  # (1, Hkv, n, D)
            if not filled:
                self.kv[p].append((pk, pv))
            if together:
                continue
            if kernel is not None:
                out[a:b] = (kernel(q[a:b], k[a:b], v[a:b], [n], scale) if not filled else
                            kernel.cached(q[a:b], keys, values, [(seg.start, filled, n)], scale))  # fmt: skip
                continue
            if filled:  # what the segment held, then these
                pk, pv = self.cache.read(layer, seg, filled, (pk, pv))  # (1, Hkv, filled + n, D)
            pq = q[a:b].transpose(0, 1)[None]  # (1, Hq, n, D)
            o = functional.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask, is_causal=mask is None,
                                                        scale=scale, enable_gqa=True)  # (1, Hq, n, D)  # fmt: skip
            out[a:b] = o[0].transpose(0, 1)
        return out
