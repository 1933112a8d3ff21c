"""int8 linear layers for CPU: weights per output channel, activations per row, int32 accumulation.

The int8 mode's fallback: where our group-quantized kernel runs (app/models/numerics/group_quant.py: AVX512-VNNI or
AVX2, and a C compiler) the mode runs it instead, 8 bits per group of 32 for weights and activations, which
is closer to fp32 on every layer (SmolLM2 SST-2 dev 84.4% against these layers' 81.7%, fp32 83.9%) and faster.

Weights are quantized once, at load: w ≈ w_scale[n] * wq[n, k], symmetric, one scale per output channel.
Activations are quantized at run time, one scale per row (per token): x ≈ x_scale[m] * xq[m, k]. The
product runs on int8 with int32 accumulation, then y[m, n] = x_scale[m] * w_scale[n] * acc[m, n] (+ bias).
Integer sums are exact, so a row's result is the same whatever other rows share the call: outputs never
depend on batch composition (a per-tensor activation scale, as `quantize_dynamic` uses, would make them).

The kernel is oneDNN's quantized linear (`torch.ops.onednn.qlinear_pointwise`, what inductor emits for
PT2E-quantized CPU graphs) over a weight prepacked once into its blocked layout. It takes activations as
uint8 with one scale and zero point for the whole call, so we hand it x / x_scale[m] + 128 with scale 1
and zero point 128: the zero point is compensated exactly in integers, and the per-row scale is applied
after. It applies w_scale itself. Why this kernel (Zen 4, 2 threads; `python -m app.bench.kernels int8` prints the
layer rates):
- `torch._int_mm` (s8 x s8) runs the same products as fast in a loop, but reorders the (cold) weight on
  every call inside the model: the W1 workload in-process ran 165 tokens/s with it against 178 prepacked.
- qlinear_pointwise with *signed* int8 activations takes a reference path (0.2 GOP/s).
- fbgemm's dynamic linear is as fast but scales activations per tensor; the weight-only kernels
  (`_weight_int8pack_mm`) run at ~7 GFLOP/s.

SmoothQuant (`smooth`): activations of some input channels are much larger than the rest, and one per-row
scale then spends most of the int8 range on them. Dividing input channel k by s[k] (and multiplying the
weight's column k by s[k]) moves that range into the weights, which are quantized per output channel and
take it well; the layer's result is unchanged before rounding.
"""

from __future__ import annotations

import torch
from torch import nn

QMAX = 127.0  # symmetric int8: [-127, 127], so -x quantizes to -q
ZERO_POINT = 128  # activations go to the kernel as uint8: x / scale + 128
SMALL_ROWS = 2  # calls with this many rows or fewer take `_int_mm` (see Int8Linear.forward)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K) and a float32 scale per output channel (N,)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp_min(1e-12)  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # (N, K)
    return q, scale


def quantize_rows(x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> integers (M, K) and a float32 scale per row (M, 1): x ≈ scale * (q - offset).
    offset 0: int8 in [-127, 127]; offset 128: uint8 in [1, 255]."""
    # abs().amax() is 5-10x faster here than linalg.vector_norm(ord=inf) (measured: 5 vs 53 us at 32 x 576).
    # A row of zeros gets a tiny scale and quantizes to zeros.
    scale = x.abs().amax(dim=-1, keepdim=True).div_(QMAX).clamp_min_(1e-12)  # (M, 1)
    q = x.div(scale).round_()  # |x / scale| <= 127 by construction
    if offset:
        return q.add_(offset).to(torch.uint8), scale
    return q.to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x @ W.T + b with W in int8 (per output channel) and x quantized per row at run time."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape  # (N, K)
        w = weight.detach().float()
        # x @ W.T = (x / s) @ (W * s).T: s (K,) takes the activations' outlier channels into the weight
        self.inv_smooth = None if smooth is None else (1.0 / smooth.float()).contiguous()  # (K,)
        if smooth is not None:
            w = w * smooth.float()[None, :]
        q, scale = quantize_weight(w)
        # An opaque oneDNN tensor (plain attributes: it has no storage to save or move), and its scales.
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.qweight = q  # (N, K) int8, for `_int_mm` at one row
        self.w_scale = scale  # (N,)
        self.w_zero = torch.zeros(self.out_features, dtype=torch.int64)  # (N,): symmetric
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if self.inv_smooth is not None:
            x2 = x2 * self.inv_smooth
        if x2.shape[0] <= SMALL_ROWS:
            # At one or two rows the prepacked kernel's fixed cost dominates: `_int_mm` on the plain int8 weight
            # ran 40 GOP/s against 21 (576 -> 1536, one row). Both sum in exact int32 and scale alike, so a row
            # gets the same bits on either path (tests/models/numerics/test_numerics.py compares them).
            xq, x_scale = quantize_rows(x2)  # (M, K) int8, (M, 1)
            acc = torch._int_mm(xq, self.qweight.t())  # (M, N) int32
            small = acc.to(torch.float32).mul_(self.w_scale).mul_(x_scale)
            if self.bias is not None:
                small.add_(self.bias)
            return small.reshape(*lead, self.out_features).to(x.dtype)
        xq, x_scale = quantize_rows(x2, offset=ZERO_POINT)  # (M, K) uint8, (M, 1)
        # w_scale[n] * sum_k (xq - 128) * wq: int32 sums, then one float multiply per element
        y: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
            xq, 1.0, ZERO_POINT, self.packed, self.w_scale, self.w_zero, None, 1.0, 0, torch.float32, "none", [], ""
        )  # (M, N)
        y.mul_(x_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        smooth = ", smoothquant" if self.inv_smooth is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 w8a8 per-row{smooth}"
