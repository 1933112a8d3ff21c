"""int4 weight-only linear layers for CPU: 4-bit weights in groups of 32 input channels, bf16 activations.

A decode step at one row reads every weight once and is bound by how fast the kernel streams them. Here
(Zen 4, 2 threads, 30 different weights so none stays in the CPU's cache) one row through SmolLM2's
gate/up product (576 -> 3072) takes ~215 us in bf16 (oneDNN, prepacked), ~120-150 us in int8 (fbgemm,
`_int_mm`) and ~55 us with PyTorch's int4 kernel `_weight_int4pack_mm_for_cpu`: it reads a quarter of
bf16's bytes and streams them faster. At 32 rows it runs ~145 GFLOP/s, below bf16's ~240 (figures:
`python -m app.bench.kernels int4`).

Weights: w[n, k] ≈ (q[n, k] - 8) * scale[g, n] + zero[g, n] with q in [0, 15] and g = k // 32, the
layout of GGUF's Q4_1 blocks (32 weights along the input, a scale and a minimum each). A model that comes
from a Q4_1 file (the offline default does) round-trips: its weights already are 16 levels per block, so
this mode serves the very weights llama.cpp serves from that file (`Int4Linear.lossless` says whether a
layer did). For other weights it is round-to-nearest quantization, with the quality cost that has.

The kernel computes each row on its own (checked: a row's output is bit-identical at 1 and at 32 rows),
so a row's result never depends on the other rows in the batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from app.models.numerics import group_quant
from app.models.numerics.group_quant import GroupQuantKernel
from app.models.numerics.levels import SourceWeight, concat
from app.models.numerics.packing import PackedLinear

GROUP = 32  # input channels per scale: GGUF's Q4_0 / Q4_1 block
LEVELS = 15  # q in [0, 15]
MID = 8  # the kernel dequantizes (q - 8) * scale + zero
# A layer whose weights sit on a 16-level grid per group already (a Q4 source) reconstructs to within
# the rounding of its bf16 scales; round-to-nearest of continuous weights errs by ~a quarter step on average.
LOSSLESS_ERROR = 0.02  # mean |w - dequantized| in steps


_pass = threading.local()


@contextmanager
def prompt_pass() -> Iterator[None]:
    """Calls inside compute a prompt's tokens (prefill, scoring), not one decode token per row.

    int4 layers run those on a bf16 copy of their (dequantized) weights: with hundreds of rows a call is
    bound by arithmetic, where bf16's kernel runs ~2.3x faster than int4's (prefill of 110-token prompts
    took twice as long on int4). The kernel follows the kind of pass, never the number of rows in a call,
    so a row's result does not depend on what else runs with it: every decode step takes the int4 kernel,
    every prompt the bf16 one."""
    before = getattr(_pass, "prompt", False)
    _pass.prompt = True
    try:
        yield
    finally:
        _pass.prompt = before


def in_prompt_pass() -> bool:
    return bool(getattr(_pass, "prompt", False))


def supports(weight: torch.Tensor) -> bool:
    """Whether the int4 kernel takes this (N, K) weight."""
    out_features, in_features = weight.shape
    return in_features % GROUP == 0 and out_features % 16 == 0


def is_four_bit(weight: torch.Tensor, rows: int = 64) -> bool:
    """Whether the weight already sits on 16 levels per group of 32 (it came from a Q4 file): judged on its
    first `rows` output channels, which is cheap and, for a quantized file, as telling as all of them."""
    return quantize_groups(weight[:rows])[2] < LOSSLESS_ERROR


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(N, K) float -> q int32 (N, K) in [0, 15], scales and zeros (K / 32, N, 2) bf16, and the mean
    reconstruction error in quantization steps."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // GROUP, GROUP)  # (N, G, 32)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
    # the kernel reads bf16 scales and zeros: quantize against the rounded ones, so q is what they encode
    scale = ((hi - lo) / LEVELS).clamp_min(1e-8).to(torch.bfloat16)  # (N, G)
    zero = (lo + MID * scale.float()).to(torch.bfloat16)  # (N, G)
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)  # (N, G, 1)
    q = torch.round((w - z) / s + MID).clamp_(0, LEVELS)  # (N, G, 32)
    error = float(((q - MID) * s + z - w).abs().div(s).mean())
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    return q.reshape(n, k).to(torch.int32), scales_zeros, error


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W in 4 bits per weight (groups of 32 input channels).

    With `kernel` (numerics/group_quant.py, where the CPU has AVX512-VNNI or AVX2) every pass runs it: activations
    to int8 per row and group, int32 sums. Without: PyTorch's int4 kernel on bf16 activations for decode
    steps and a bf16 copy of the weights for prompt passes (see `prompt_pass`)."""

    def __init__(self, weight: torch.Tensor | SourceWeight, bias: torch.Tensor | None,
                 kernel: GroupQuantKernel | None = None) -> None:  # fmt: skip
        """`weight`: (N, K) float, rounded to 16 levels per group here, or a file's 4-bit levels (numerics/levels.py),
        taken as they are."""
        super().__init__()
        self.out_features, self.in_features = weight.shape  # (N, K)
        self.kernel = kernel
        self.wide: PackedLinear | None = None
        self.kind = group_quant.Q4  # the kernel's: Q4K for a file's Q4_K levels, held with their own scales
        if isinstance(weight, torch.Tensor):
            q, scales_zeros, self.error = quantize_groups(weight)
        elif kernel is not None:  # packed a few tiles at a time: the layer is never held unpacked whole
            self.error, self.lossless = 0.0, True
            self.packed, self.scales_zeros, self.kind = group_quant.pack4_levels(weight)
            self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)
            return
        else:
            (q, scales_zeros), self.error = concat(list(weight.chunks())).four_bit_scales(), 0.0
        self.lossless = self.error < LOSSLESS_ERROR
        # plain attributes: the packed tensors' layouts are the kernels' own, not weights to save or move
        if kernel is not None:
            self.packed, self.scales_zeros = group_quant.pack4(q, scales_zeros)  # (N/16, K/32, 4, 16, 4), (.., 2, 16)
            self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)
            return
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)  # (N, K / 2) uint8
        self.scales_zeros = scales_zeros  # (K / 32, N, 2) bf16
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        # for prompt passes (see prompt_pass): the weights this layer computes with, in bf16, where oneDNN has
        # a bf16 kernel (avx512bw/vl/dq or avx_ne_convert; else it refuses the weight and prompts take int4's)
        self.wide = (PackedLinear(dequantize(q, scales_zeros), bias, dtype=torch.bfloat16)
                     if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if self.kernel is not None:
            return self.kernel(x, self.packed, self.scales_zeros, self.bias, self.out_features, self.kind)
        if in_prompt_pass() and self.wide is not None:
            wide: torch.Tensor = self.wide(x)
            return wide
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, K)
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_zeros)  # (M, N) bf16
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N / 2)
        """As a fused gate/up product (gate's N / 2 outputs, then up's): silu(gate) * up, in the kernel's store.
        Only with `kernel`."""
        assert self.kernel is not None, "SwiGLU in the product needs the group-quantized kernel"
        return self.kernel(x, self.packed, self.scales_zeros, self.bias, self.out_features, self.kind,
                           swiglu=True)  # fmt: skip

    def extra_repr(self) -> str:
        kind = "lossless" if self.lossless else f"error {self.error:.2f} steps"
        kind += ", Q4_K's scales" if self.kind == group_quant.Q4K else ""
        kernel = f"w4a8 {self.kernel.isa}" if self.kernel is not None else "torch int4"
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{GROUP} ({kind}, {kernel})"


def dequantize(q: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """q (N, K) and scales/zeros (K / 32, N, 2) -> the weight (N, K) float32 the kernel computes with."""
    sz = scales_zeros.float().transpose(0, 1).repeat_interleave(GROUP, dim=1)  # (N, K, 2)
    weight: torch.Tensor = (q.float() - MID) * sz[..., 0] + sz[..., 1]  # (N, K)
    return weight
