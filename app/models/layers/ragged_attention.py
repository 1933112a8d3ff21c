"""Decode attention over the ragged KV cache, as a small C kernel built for the CPU it runs on.

At decode each row brings one query token and reads its own cached keys and values: the step is bound by
reading the cache. PyTorch has no kernel for rows of different lengths, so the padded cache read every row
as long as the longest one, and its batched matmuls over (rows x heads) products of 3 x 64 x length ran at a
fraction of the memory bandwidth; a loop of per-row matmuls costs more in calls than it saves. This kernel
(kernels/ragged_decode.c) reads each row's real tokens once, split into jobs of up to CHUNK tokens over the
engine's threads: `python -m app.bench.kernels ragged_attention` prints it against the torch path.

Built on first use for the CPU it runs on, with the model's shape as constants (app/models/kernels/compiled.py).
Without a compiler, or for shapes and dtypes it does not cover, `load` returns None and the cache uses its
torch path (the same result to float rounding; tests compare the two).
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import torch

from app.models.kernels import compiled

BLOCK = 16  # tokens per block: the kernel's vector of scores
CHUNK = 256  # most tokens one job reads: a long row spreads over the threads
KV_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # what the arena may store for the kernels
SOURCE = "ragged_decode.c"
PROFILE_NAME = "textgen::ragged_decode"


class DecodeAttentionKernel:
    """The built kernel for one model shape: `(q, scale, K, V, plan) -> out`."""

    def __init__(self, path: Path, kv_heads: int, group: int, head_dim: int) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.fn = self.lib.ragged_decode
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self.fn.argtypes = [p, f, p, p, i, p, p, p, p, i, p, i, p, p, p, p, p, i]
        self.fn.restype = None
        self._put = self.lib.ragged_put
        self._put.argtypes = [p, p, p, p, i, p, p, i, i]
        self._put.restype = None
        self.kv_heads, self.group, self.head_dim = kv_heads, group, head_dim

    def put(self, keys: torch.Tensor, values: torch.Tensor, blk: torch.Tensor, slot: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor) -> None:  # fmt: skip
        """Tokens k, v (T, H, D) contiguous fp32 into keys (H, NB, D, 16) and values (H, NB, 16, D) at blocks and
        slots (T,) int64, in the cache's dtype."""
        self._put(k.data_ptr(), v.data_ptr(), blk.data_ptr(), slot.data_ptr(), k.shape[0], keys.data_ptr(),
                  values.data_ptr(), keys.shape[1], torch.get_num_threads())  # fmt: skip

    def __call__(self, q: torch.Tensor, scale: float, keys: torch.Tensor, values: torch.Tensor, k_new: torch.Tensor,
                 v_new: torch.Tensor, plan: DecodeJobs) -> torch.Tensor:  # fmt: skip
        """q (B, Hq, D) contiguous fp32; keys (H, NB, D, 16), values (H, NB, 16, D); each row's new token k_new,
        v_new (B, H, D) contiguous, stored first at its position -> (B, Hq, D)."""
        out = torch.empty_like(q)
        pm, pl, pacc = plan.scratch(q.shape[1], q.shape[2])
        args = (q.data_ptr(), scale, keys.data_ptr(), values.data_ptr(), keys.shape[1], k_new.data_ptr(),
                v_new.data_ptr(), plan.held.data_ptr(), plan.starts.data_ptr(), plan.rows, plan.jobs.data_ptr(),
                plan.njobs, plan.first.data_ptr(), pm.data_ptr(), pl.data_ptr(), pacc.data_ptr(), out.data_ptr(),
                torch.get_num_threads())  # fmt: skip
        compiled.call(PROFILE_NAME, self.fn, *args)  # what app/bench/step_profile counts as attention
        return out


class DecodeJobs:
    """One decode step's split of rows into jobs, shared by every layer: rows' first blocks `starts` (B,) and
    their lengths (tokens, the new one included)."""

    def __init__(self, starts: list[int], lengths: list[int]) -> None:
        """`lengths`: each row's tokens with the new one (which goes at position length - 1)."""
        jobs: list[tuple[int, int, int]] = []
        first = [0]
        for row, n in enumerate(lengths):
            jobs.extend((row, t0, min(n, t0 + CHUNK)) for t0 in range(0, n, CHUNK))
            first.append(len(jobs))
        self.rows = len(lengths)
        self.njobs = len(jobs)
        self.starts = torch.tensor(starts, dtype=torch.int32)  # (B,)
        self.held = torch.tensor([n - 1 for n in lengths], dtype=torch.int32)  # (B,): where the new token goes
        self.jobs = torch.tensor(jobs, dtype=torch.int32)  # (J, 3): row, first token, end token
        self.first = torch.tensor(first, dtype=torch.int32)  # (B + 1,)
        self._scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def scratch(self, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._scratch is None:
            self._scratch = (torch.empty(self.njobs, heads), torch.empty(self.njobs, heads),
                             torch.empty(self.njobs, heads, dim))  # fmt: skip
        return self._scratch


def kv_defines(kv_dtype: torch.dtype) -> dict[str, int]:
    """The kernels' macros for a cache of `kv_dtype` (kernels/kv_type.h)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"no attention kernel for a {kv_dtype} cache")
    return {"KV_BF16": int(kv_dtype == torch.bfloat16), "KV_I8": int(kv_dtype == torch.int8)}


def block_elements(kv_dtype: torch.dtype, head_dim: int) -> int:
    """Elements (of `kv_dtype`) of one head's block of BLOCK tokens in the arena: their values, then (int8)
    their fp32 scales."""
    return head_dim * BLOCK + (4 * BLOCK if kv_dtype == torch.int8 else 0)


@cache
def load(kv_heads: int, group: int, head_dim: int,
         kv_dtype: torch.dtype = torch.float32) -> DecodeAttentionKernel | None:  # fmt: skip
    """The kernel for this attention shape, built if needed; None where it cannot run (then: the torch path).
    `kv_dtype`: what the cache stores: fp32, bf16 (widened as read) or int8 with a scale per token and head
    (applied to the scores and the softmax weights)."""
    if os.environ.get("TEXTGEN_RAGGED_KERNEL", "1") == "0" or head_dim % 16 or head_dim > 256:
        return None
    defines = {"H": kv_heads, "G": group, "D": head_dim, "CH": CHUNK, **kv_defines(kv_dtype)}
    return compiled.load(SOURCE, "ragged attention kernel",
                         lambda path: DecodeAttentionKernel(path, kv_heads, group, head_dim),
                         defines, extra_flags=("-ffast-math",))  # fmt: skip
