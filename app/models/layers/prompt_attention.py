"""Causal attention of whole prompts, several in one call, as a small C kernel (kernels/prompt_attention.c).

A prefill's attention runs on the K/V it just computed: each prompt token attends to the prompt up to itself.
PyTorch's CPU flash kernel (what `sdpa` runs) takes 0.4-0.5 ms a layer for one 110-token SmolLM2 prompt, a
sixth of the int4 mode's prompt pass; this kernel runs the same products with each key vector serving 8 query
rows and one call per layer for all the pass's prompts: `python -m app.bench.kernels prompt_attention` prints both.

Used by the written-out prompt pass (app/engine/kv_views.PromptView): prompts computed from their first token
attend over their fresh K/V; a chunk after earlier ones, or after a reused prefix, over its segment of the
cache where it lies (`PromptAttentionKernel.cached`: no copy of the prefix, where `sdpa`'s path copied it).
Built on first use with the model's shape as constants; None where it does not build
(then `sdpa`).
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import torch
from torch.nn import functional

from app.models.kernels import compiled
from app.models.layers import ragged_attention

SOURCE = "prompt_attention.c"
PROFILE_NAME = "textgen::prompt_attention"
BLOCK = 16  # keys per vector of scores: each prompt's keys are laid out in whole vectors


class PromptAttentionKernel:
    """The built kernel for one model shape: `(q, k, v, lengths, scale) -> out`, and `cached`."""

    def __init__(self, path: Path, kv_heads: int, group: int, head_dim: int) -> None:
        lib = ctypes.CDLL(str(path))
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self.fn = lib.prompt_attention
        self.fn.argtypes = [p, p, p, p, i, f, p, p, i]
        self.fn.restype = None
        self.fn_cached = lib.prompt_attention_cached
        self.fn_cached.argtypes = [p, p, p, i, p, p, p, i, f, p, i]
        self.fn_cached.restype = None
        self.kv_heads, self.group, self.head_dim = kv_heads, group, head_dim

    def cached(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prompts: list[tuple[int, int, int]],
               scale: float) -> torch.Tensor:  # fmt: skip
        """q (T, Hq, D) contiguous fp32, the passes of `prompts` (first block, tokens held before, tokens in the
        pass) one after another; keys (H, NB, D, 16), values (H, NB, 16, D): the cache's arena, the passes'
        tokens already in it -> (T, Hq, D)."""
        offsets = torch.tensor([0, *(n for _, _, n in prompts)], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        starts = torch.tensor([start for start, _, _ in prompts], dtype=torch.int32)
        filled = torch.tensor([held for _, held, _ in prompts], dtype=torch.int32)
        out = torch.empty_like(q)
        args = (q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.shape[1], offsets.data_ptr(), starts.data_ptr(),
                filled.data_ptr(), len(prompts), scale, out.data_ptr(), torch.get_num_threads())  # fmt: skip
        compiled.call(PROFILE_NAME, self.fn_cached, *args)
        return out

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                 scale: float) -> torch.Tensor:  # fmt: skip
        """q (T, Hq, D), k, v (T, H, D) contiguous fp32, the prompts of `lengths` one after another -> (T, Hq, D)."""
        offsets = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)  # (P + 1,)
        padded = sum(-(-n // BLOCK) * BLOCK for n in lengths)
        scratch = q.new_empty(self.kv_heads, padded, self.head_dim)  # each prompt's keys, transposed per head
        out = torch.empty_like(q)
        args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), offsets.data_ptr(), len(lengths), scale,
                scratch.data_ptr(), out.data_ptr(), torch.get_num_threads())  # fmt: skip
        compiled.call(PROFILE_NAME, self.fn, *args)  # what app/bench/step_profile counts as attention
        return out


@cache
def load(kv_heads: int, group: int, head_dim: int,
         kv_dtype: torch.dtype = torch.float32) -> PromptAttentionKernel | None:  # fmt: skip
    """The kernel for this attention shape, built if needed; None where it cannot run (then: sdpa). `kv_dtype`:
    what the cache `cached` reads holds (fp32, bf16, or int8 with a scale per token and head)."""
    if os.environ.get("TEXTGEN_PROMPT_KERNEL", "1") == "0" or head_dim % 16 or head_dim > 256:
        return None
    defines = {"H": kv_heads, "G": group, "D": head_dim, **ragged_attention.kv_defines(kv_dtype)}
    return compiled.load(SOURCE, "prompt attention kernel",
                         lambda path: PromptAttentionKernel(path, kv_heads, group, head_dim),
                         defines, extra_flags=("-ffast-math",), libs=("-lmvec",))  # fmt: skip


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scale: float) -> torch.Tensor:
    """What the kernel computes, through sdpa: (T, Hq, D)."""
    out, start = [], 0
    for n in lengths:
        rows = slice(start, start + n)
        o = functional.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], k[rows].transpose(0, 1)[None],
                                                    v[rows].transpose(0, 1)[None], is_causal=True, scale=scale,
                                                    enable_gqa=True)  # (1, Hq, n, D)  # fmt: skip
        out.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(out)
