"""Decode attention over the ragged KV cache, as a small C kernel built for the CPU it runs on.

At decode each row brings one query token and reads its own cached keys and values: the step is bound by
reading the cache. PyTorch has no kernel for rows of different lengths, so the padded cache read every row
as long as the longest one, and its batched matmuls over (rows x heads) products of 3 x 64 x length ran at a
fraction of the memory bandwidth; a loop of per-row matmuls costs more in calls than it saves. This kernel
(kernels/ragged_decode.c) reads each row's real tokens once, split into jobs of up to CHUNK tokens over the
engine's threads: `python -m app.models.ragged_attention` prints it against the torch path.

Built on first use for the CPU it runs on, with the model's shape as constants (app/models/kernel_build.py).
Without a compiler, or for shapes and dtypes it does not cover, `load` returns None and the cache uses its
torch path (the same result to float rounding; tests compare the two).
"""

from __future__ import annotations

import ctypes
import os
import time
from functools import cache
from pathlib import Path

import torch

from app.models import kernel_build

BLOCK = 16  # tokens per block: the kernel's vector of scores
CHUNK = 256  # most tokens one job reads: a long row spreads over the threads
KV_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # what the arena may store for the kernels
SOURCE = "ragged_decode.c"
PROFILE_NAME = "textgen::ragged_decode"


class Kernel:
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
                 v_new: torch.Tensor, plan: Plan) -> torch.Tensor:  # fmt: skip
        """q (B, Hq, D) contiguous fp32; keys (H, NB, D, 16), values (H, NB, 16, D); each row's new token k_new,
        v_new (B, H, D) contiguous, stored first at its position -> (B, Hq, D)."""
        out = torch.empty_like(q)
        pm, pl, pacc = plan.scratch(q.shape[1], q.shape[2])
        args = (q.data_ptr(), scale, keys.data_ptr(), values.data_ptr(), keys.shape[1], k_new.data_ptr(),
                v_new.data_ptr(), plan.held.data_ptr(), plan.starts.data_ptr(), plan.rows, plan.jobs.data_ptr(),
                plan.njobs, plan.first.data_ptr(), pm.data_ptr(), pl.data_ptr(), pacc.data_ptr(), out.data_ptr(),
                torch.get_num_threads())  # fmt: skip
        kernel_build.call(PROFILE_NAME, self.fn, *args)  # what app/bench/step_profile counts as attention
        return out


class Plan:
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
def load(kv_heads: int, group: int, head_dim: int, kv_dtype: torch.dtype = torch.float32) -> Kernel | None:
    """The kernel for this attention shape, built if needed; None where it cannot run (then: the torch path).
    `kv_dtype`: what the cache stores: fp32, bf16 (widened as read) or int8 with a scale per token and head
    (applied to the scores and the softmax weights)."""
    if os.environ.get("TEXTGEN_RAGGED_KERNEL", "1") == "0" or head_dim % 16 or head_dim > 256:
        return None
    defines = {"H": kv_heads, "G": group, "D": head_dim, "CH": CHUNK, **kv_defines(kv_dtype)}
    return kernel_build.load(SOURCE, "ragged attention kernel", lambda path: Kernel(path, kv_heads, group, head_dim),
                             defines, extra_flags=("-ffast-math",))  # fmt: skip


def _bench() -> None:  # pragma: no cover - a measurement, run by hand
    import random

    from torch import nn

    from app.engine.kv_cache import RaggedCache
    from app.engine.kv_views import DecodeView

    torch.set_num_threads(2)
    layers, kv_heads, group, dim = 30, 3, 3, 64  # SmolLM2-135M
    random.seed(0)
    cases = {
        "W1-like: 32 rows of 40-330": [random.randint(40, 330) for _ in range(32)],
        "one 6000 + 31 of 20-84": [6000] + [random.randint(20, 84) for _ in range(31)],
        "one row of 300": [300],
    }
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
    print(f"{'rows':<28} {'tokens':>7}" + "".join(f" {'kernel ' + n + ' ms':>15}" for n in dtypes)
          + f" {'torch ms':>9}   (30 layers, 3 kv heads x 3, 64 dims)")  # fmt: skip
    for name, lengths in cases.items():
        times = []
        for use_kernel, kv_dtype in [*((True, d) for d in dtypes.values()), (False, torch.float32)]:
            cache = RaggedCache(layers, sum(lengths) + 16 * len(lengths), kernel=use_kernel, kv_dtype=kv_dtype)
            example = [(torch.zeros(1, kv_heads, 1, dim), torch.zeros(1, kv_heads, 1, dim))] * layers
            cache.allocate(example, kv_heads * group)
            segments = [cache.hold(n + 1) for n in lengths]
            for layer in range(layers):
                for seg, n in zip(segments, lengths, strict=True):
                    cache.write(layer, seg, 0, torch.randn(1, kv_heads, n, dim), torch.randn(1, kv_heads, n, dim))
            q = torch.randn(len(lengths), kv_heads * group, 1, dim)
            k = torch.randn(len(lengths), kv_heads, 1, dim)

            def run() -> None:
                view = DecodeView(cache, segments, lengths)  # noqa: B023
                for layer in range(layers):
                    view.attend(layer, nn.Module(), q, k, k, dim**-0.5)  # noqa: B023

            with torch.inference_mode():
                for _ in range(3):
                    run()
                best = float("inf")
                for _ in range(5):  # the best of five: this machine's speed swings between runs
                    started = time.perf_counter()
                    for _ in range(5):
                        run()
                    best = min(best, (time.perf_counter() - started) / 5 * 1000)
            times.append(best)
        print(f"{name:<28} {sum(lengths):>7}" + "".join(f" {t:>15.1f}" for t in times))


if __name__ == "__main__":  # pragma: no cover
    _bench()

