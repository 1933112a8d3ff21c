"""Prepacked linear layers for CPU inference.

`F.linear` on CPU calls a plain GEMM that re-reads the weight in its row-major layout every call; at
decode batch sizes (a few to 32 rows) that runs at 40-120 GFLOP/s here. oneDNN with the weight reordered
once into its blocked layout runs the same products at 140-200 GFLOP/s, and the output layer (49152 x 576
for SmolLM2) about 2-3x faster (figures: `python -m app.bench.kernels packing`). This is the kernel PyTorch's
own inductor uses for frozen CPU graphs; we call it directly so no compile step is needed.

A packed layer gives each row the same result whatever the other rows are (checked in
tests/models/numerics/test_packing.py), so outputs do not depend on batch composition. One exception had to be
mended: for some shapes oneDNN runs a single row through another kernel (a split-K GEMV, seen in fp32 where
K > N: 3072 -> 768, 1536 -> 576, 2048 -> 512) whose sums round differently, so a row alone got other
logits than the same row beside others (GPT-2 small's rows were not batch-invariant). Such a layer is
found by a probe when it is packed, and computes a lone row as two (as fast: 96 vs 109 us at 3072 -> 768).
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from app.models.numerics.fusion import WeightBias, as_linear, linear_layers
from app.models.numerics.levels import dense

log = logging.getLogger(__name__)

# Every input shape gets its own compiled primitive, kept in two LRU caches of 1024 by default (PyTorch's
# ideep layer: LRU_CACHE_CAPACITY; oneDNN itself: ONEDNN_PRIMITIVE_CACHE_CAPACITY), and every prompt length
# is a new shape. Those caches held ~450 MB after a few thousand prompts of random lengths (tiny-gpt2,
# up to 1024 tokens: 871 MB RSS against 476 MB with 64 entries), and kept growing for minutes under
# traffic. 64 hold the decode shapes and recent prefills; a miss costs well under a millisecond, which
# throughput did not show. Both are read when the first primitive is made, so setting them here
# (before any model runs) is in time; values from the environment win.
for _cache in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "64")


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W held in oneDNN's layout (the dense weight is dropped unless tied).

    `dtype=torch.bfloat16` keeps W in bf16: the input is cast to bf16 and the output back to the input's
    dtype, so the rest of the model (norms, attention, KV cache) stays in fp32 (oneDNN accumulates in fp32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape  # (N, K)
        self.dtype = dtype or weight.dtype
        # A plain attribute, not a parameter: an opaque oneDNN tensor has no storage to save or move.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(self.dtype), None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(self.dtype), requires_grad=False)
        # K > N: where the split-K kernel was seen (in bf16 it shows only where it changes an output's rounding,
        # which a probe can miss); elsewhere a probe decides
        self.pad_one_row = self.in_features > self.out_features or self._one_row_differs()

    def _one_row_differs(self) -> bool:
        """Does a single row take another kernel than the same row among others (module docstring)? In bf16
        the difference shows only where it changes a rounding of the output: 16 rows, each alone."""
        x = torch.randn(16, self.in_features, generator=torch.Generator().manual_seed(0)).to(self.dtype)  # (16, K)
        with torch.inference_mode():
            together = self._run(x)
            return any(not torch.equal(self._run(x[i : i + 1]), together[i : i + 1]) for i in range(16))

    def _run(self, x: torch.Tensor) -> torch.Tensor:  # (M, K) -> (M, N)
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        # oneDNN wants a contiguous input; slices such as hidden[:, -1:, :] are not
        flat = x.to(self.dtype).contiguous()
        if self.pad_one_row and flat.numel() == self.in_features:
            y = self._run(flat.view(1, -1).expand(2, -1).contiguous())[:1].view(*x.shape[:-1], -1)  # (..., N)
        else:
            y = self._run(flat)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN {dtype}"


def can_pack(model: nn.Module) -> bool:
    param = next(model.parameters())
    return param.device.type == "cpu" and param.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def own_memory(model: nn.Module) -> None:
    """from_pretrained may leave the weights as views of one memory-mapped checkpoint, which stays resident
    while any view lives: give what is left after replacing the linears (embeddings, norms) its own memory."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()


def pack_linears(model: nn.Module) -> int:
    """Replace every linear layer of `model` (in place) with a PackedLinear; return how many."""
    started = time.perf_counter()
    targets: list[tuple[nn.Module, str, WeightBias]] = []
    for parent, name, child in linear_layers(model):
        found = as_linear(child)
        assert found is not None
        targets.append((parent, name, found))
    for parent, name, (weight, bias) in targets:
        setattr(parent, name, PackedLinear(dense(weight), bias))
    own_memory(model)
    log.info("packed %d linear layers for oneDNN in %.1fs", len(targets), time.perf_counter() - started)
    return len(targets)
