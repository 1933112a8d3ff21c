"""Group-quantized weights times int8 activations on AVX512-VNNI or AVX2 (kernels/group_quant.c): the int4 and
int8 modes' kernel.

PyTorch's int4 kernel (`_weight_int4pack_mm_for_cpu`) takes bf16 activations and computes in fp32: at 32
rows it ran ~115 GOP/s here, below bf16's prepacked kernel, so prompt passes needed a bf16 copy of every
weight. This kernel quantizes each row's activations to int8 per group of 32 inputs (the groups the weights
have: llama.cpp's Q4_1 / Q8_0 x Q8 scheme) and sums the products in exact int32 with vpdpbusd. Measured here
(`python -m app.bench.kernels group_quant`, 2 threads, 30 weights so none stays in cache), us per call:

| K -> N | rows | torch int4 | 4-bit, this kernel | bf16 prepacked |
|---|---|---|---|---|
| 576 -> 960 | 1 | 42 | 16 | |
| 576 -> 3072 | 1 | 90 | 55 | |
| 576 -> 3072 | 32 | 970 | 344 | |
| 1536 -> 576 | 32 | 506 | 168 | |
| 576 -> 3072 | 256 | | 2116 | 2634 |

So one kernel serves decode steps and prompts alike, faster than either kernel it replaces, and the bf16
copy is gone. On AVX2 it runs with vpmaddubsw + vpmaddwd; on a CPU with AMX, blocks of 16 rows take tdpbsud for
the same exact integer sums and the same float steps after them, so the same outputs bit for bit (figures for
both: docs/numerics.md).
With 8-bit weights it runs the int8 mode's every layer, and the int4 mode's output layer from half the bytes
of bf16: symmetric where the weights are Q8_0's already (SmolLM2's file holds its output layer so), else with a
scale and a zero per group (Q8Z), whose 255 levels hold a 4-bit source exactly. The int8 mode ran oneDNN's int8
product before (one scale per output channel and per row, SmoothQuant; app/models/numerics/int8.py, now the fallback
without a compiler). On SmolLM2, against it: SST-2 dev 84.4% against 81.7% (fp32 83.9%), its 52 flipped answers
down to 12, since the per-group scales take the activations' outlier channels and the weights lose nothing;
and every layer on this kernel, the down projections and the output layer too, so the decode step runs in
one C call (app/models/layers/native_step.py). The cost of either width: activations in 8 bits per group of 32 (the
relative error of one product ~0.5% on random data; perplexity and task accuracy in docs/numerics.md
table).

Each row's result is computed by the same instructions whatever other rows share the call, so it does not
depend on the batch (tests compare rows alone and together, bit for bit).
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache
from pathlib import Path

import torch
from torch import nn

from app.models.kernels import compiled
from app.models.numerics.levels import Q4KScales, SourceWeight, tiles

GROUP = 32  # inputs per group: the weights' and the activations'
TILE = 16  # outputs per tile: one vector of int32 sums
# The weights' kinds, kernels/group_quant.c's numbers: 4 bits with a scale and a zero (Q4_1), 8 bits symmetric
# (Q8_0), 8 bits with a scale and a zero per group (Q8Z)
Q4, Q4K, Q8, Q8Z = 4, 5, 8, 9
Q4K_GROUPS = 8  # Q4K's groups per super-block (GGUF Q4_K's 256 weights), whose D and Dmin they share
Q4K_SUPER_BYTES = 320  # a tile's Q4K scales per super-block: D and Dmin (16 fp16 each), then 8 x (sc, m) x 16
# A weight that sits on the symmetric 8-bit grid of its groups already (a Q8_0 source) reconstructs to within
# float rounding; round-to-nearest of other weights errs by ~a quarter level on average.
LOSSLESS_ERROR = 1e-3  # mean |w - dequantized| in levels
PROFILE_NAME = "textgen::group_quant"  # what app/bench/step_profile counts as a linear layer
# torch's capability names, either set; the C file checks them too and builds for the one the CPU has
NEEDS = (("avx512_f", "avx512_bw", "avx512_vnni"), ("avx2", "fma3"))


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in [0, 15] -> the kernel's 4-bit weights (N / 16, K / 32, 4, 16, 4) uint8 (Q4's and Q4K's)."""
    n, k = q.shape
    tiles, groups = n // TILE, k // GROUP
    # input k = 32 g + 8 p + 4 h + i: h = 0 goes to the low nibble, h = 1 to the high one
    q6 = q.to(torch.uint8).reshape(tiles, TILE, groups, 4, 2, 4)  # (T, 16, G, p, h, i)
    nibbles = q6[..., 0, :] | (q6[..., 1, :] << 4)  # (T, 16, G, p, i)
    return nibbles.permute(0, 2, 3, 1, 4).contiguous()  # (T, G, p, 16, i)


def pack4(q: torch.Tensor, scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) in [0, 15] and scales/zeros (K / 32, N, 2) bf16 -> the kernel's weights (N / 16, K / 32, 4,
    16, 4) uint8 and scales (N / 16, K / 32, 2, 16) as bf16 bits (see kernels/group_quant.c for the layout)."""
    n, k = q.shape
    tiles, groups = n // TILE, k // GROUP
    weights = pack_nibbles(q)
    scales = scales_zeros.view(torch.int16).reshape(groups, tiles, TILE, 2).permute(1, 0, 3, 2).contiguous()
    return weights, scales  # (T, G, 4, 16, 4), (T, G, 2, 16)


def quantize8(weight: torch.Tensor, measure: bool = True) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(N, K) float -> q int8 (N, K), symmetric per output and group of 32 (GGUF Q8_0: d = amax / 127), d (N,
    K / 32) fp32, and the mean reconstruction error in steps (~0 for weights that came from a Q8_0 file)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // GROUP, GROUP)  # (N, G, 32)
    d = w.abs().amax(dim=-1) / 127  # (N, G)
    safe = torch.where(d > 0, d, torch.ones_like(d)).unsqueeze(-1)  # (N, G, 1)
    q = torch.round(w / safe).clamp_(-127, 127)  # (N, G, 32)
    error = float((q * safe - w).abs().div(safe).mean()) if measure else float("nan")  # measure: a pass more
    return q.reshape(n, k).to(torch.int8), d, error


def quantize8_zero(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(N, K) float -> u uint8 (N, K) in [0, 255], d and z (N, K / 32) fp32 with w ~ (u - 128) d + z: 255 levels
    from each group's least weight to its greatest (a 4-bit source's 16 levels are every 17th of them, held
    exactly), and the mean reconstruction error in levels."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // GROUP, GROUP)  # (N, G, 32)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
    d = (hi - lo) / 255  # (N, G)
    safe = torch.where(d > 0, d, torch.ones_like(d)).unsqueeze(-1)  # (N, G, 1); a constant group: u = 0, w = z
    u = torch.round((w - lo.unsqueeze(-1)) / safe).clamp_(0, 255)  # (N, G, 32)
    z = lo + 128 * d  # (N, G): w = u d + lo
    error = float(((u - 128) * d.unsqueeze(-1) + z.unsqueeze(-1) - w).abs().div(safe).mean())
    return u.reshape(n, k).to(torch.uint8), d, z, error


def pack8(u: torch.Tensor, d: torch.Tensor, z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """u (N, K) uint8 (Q8_0's q + 128), d and z (N, K / 32) -> the kernel's weights (N / 16, K / 32, 8, 16, 4)
    uint8 and scales (N / 16, K / 32, 16) fp32, or (N / 16, K / 32, 2, 16) d then z where there are zeros."""
    n, k = u.shape
    tiles, groups = n // TILE, k // GROUP
    weights = u.reshape(tiles, TILE, groups, 8, 4).permute(0, 2, 3, 1, 4).contiguous()  # (T, G, j, 16, i)
    planes = [d] if z is None else [d, z]
    scales = torch.stack([p.float().reshape(tiles, TILE, groups) for p in planes], dim=2)  # (T, 16, P, G)
    return weights, scales.permute(0, 3, 2, 1).contiguous().squeeze(2)  # (T, G, P, 16), P = 1 dropped


def pack4k(q: torch.Tensor, scales: Q4KScales) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) in [0, 15] and Q4_K's scales (D, Dmin (N, K / 256) fp16, sc, m (N, K / 32) uint8) -> the kernel's
    weights (as pack4's) and Q4K scales (N / 16, K / 256, 320) bytes (kernels/group_quant.c's layout)."""
    n, k = q.shape
    tiles, supers = n // TILE, k // (GROUP * Q4K_GROUPS)
    D, Dmin, sc, m = scales

    def per_tile(x: torch.Tensor) -> torch.Tensor:  # (N, S) fp16 -> (T, S, 32) bytes: 16 outputs' values
        return x.contiguous().view(torch.uint8).reshape(tiles, TILE, supers, 2).permute(0, 2, 1, 3).reshape(
            tiles, supers, 2 * TILE)  # fmt: skip

    levels = torch.stack([sc, m], dim=-1).reshape(tiles, TILE, supers, Q4K_GROUPS, 2)  # (T, 16, S, 8, 2)
    levels = levels.permute(0, 2, 3, 4, 1).reshape(tiles, supers, Q4K_GROUPS * 2 * TILE)  # (T, S, 8 x (sc, m) x 16)
    packed = torch.cat([per_tile(D), per_tile(Dmin), levels], dim=-1).contiguous()  # (T, S, 320)
    return pack_nibbles(q), packed


def pack4_levels(source: SourceWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A file's 4-bit levels -> the kernel's weights, scales and kind, filled a few tiles at a time: Q4K where the
    file's are Q4_K's (exact), else pack4's (Q4)."""
    n, k = source.shape
    kind = Q4K if source.q4k else Q4
    weights = torch.empty(n // TILE, k // GROUP, 4, TILE, 4, dtype=torch.uint8)
    if kind == Q4K:
        scales = torch.empty(n // TILE, k // (GROUP * Q4K_GROUPS), Q4K_SUPER_BYTES, dtype=torch.uint8)
    else:
        scales = torch.empty(n // TILE, k // GROUP, 2, TILE, dtype=torch.int16)
    for row, chunk in tiles(source.chunks()):
        at = slice(row // TILE, (row + chunk.shape[0]) // TILE)
        if kind == Q4K:
            assert chunk.k is not None
            weights[at], scales[at] = pack4k(chunk.u, chunk.k)
        else:
            weights[at], scales[at] = pack4(*chunk.four_bit_scales())
    return weights, scales, kind


def pack8_levels(source: SourceWeight, zeros: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A file's levels (any width) -> pack8's weights and scales (with a zero plane where `zeros`), filled a few tiles
    at a time."""
    n, k = source.shape
    weights = torch.empty(n // TILE, k // GROUP, 8, TILE, 4, dtype=torch.uint8)
    scales = torch.empty(n // TILE, k // GROUP, *((2,) if zeros else ()), TILE)
    for row, chunk in tiles(source.chunks()):
        eight = chunk.as_eight_bits()
        z = eight.z if eight.z is not None or not zeros else torch.zeros_like(eight.d)
        at = slice(row // TILE, (row + chunk.shape[0]) // TILE)
        weights[at], scales[at] = pack8(eight.u, eight.d, z)
    return weights, scales


def supports(weight: torch.Tensor, padded: bool = False) -> bool:
    """Whether the kernel takes this (N, K) weight: whole groups of inputs, whole tiles of outputs (`padded`: any
    number of outputs, the last tile filled with zero rows, as Int8GroupLinear does)."""
    out_features, in_features = weight.shape
    return in_features % GROUP == 0 and (padded or out_features % TILE == 0)


class _Scratch(threading.local):
    """Per thread: the int8 activations and their scales, grown as needed (no allocation per call)."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def get(self, rows: int, in_features: int) -> tuple[int, int, int, int]:
        """Addresses of xq (M, K) int8, dx and sx (M, K / 32) fp32, so (M, K / 32) int32."""
        groups = in_features // GROUP
        offset = (rows * in_features + 63) // 64 * 64  # the scales after the int8 rows, aligned
        size = offset + 3 * 4 * rows * groups
        if self.buffer.numel() < size:
            self.buffer = torch.empty(max(size, 2 * self.buffer.numel()), dtype=torch.uint8)
        base = self.buffer.data_ptr()
        return base, base + offset, base + offset + 4 * rows * groups, base + offset + 8 * rows * groups


class GroupQuantKernel:
    """The built kernel: `(x, weights, scales, bias, out_features, bits) -> y`."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        p, i = ctypes.c_void_p, ctypes.c_int
        self.fns = {Q4: lib.group_quant, Q4K: lib.group_quant_q4k, Q8: lib.q8_linear, Q8Z: lib.q8z_linear}
        # a fused gate/up product with SwiGLU at its store: y (M, N / 2) = silu(gate) * up
        self.swiglu_fns = {Q4: lib.group_quant_swiglu, Q4K: lib.group_quant_q4k_swiglu, Q8: lib.q8_linear_swiglu,
                           Q8Z: lib.q8z_linear_swiglu}  # fmt: skip
        lib.group_quant_isa.restype = ctypes.c_int
        lib.group_quant_amx.restype = ctypes.c_int
        lib.group_quant_amx.argtypes = [ctypes.c_int]
        self._amx = lib.group_quant_amx
        self.amx = bool(self._amx(1))  # calls of 16 rows or more take the tile unit
        self.isa = "avx512-vnni" if lib.group_quant_isa() == 512 else "avx2"  # what this build runs on
        if self.amx:
            self.isa += "+amx"
        for fn in (*self.fns.values(), *self.swiglu_fns.values()):
            fn.argtypes = [p, i, i, i, p, p, p, p, p, p, p, p, i]
            fn.restype = None
        self.scratch = _Scratch()

    def use_amx(self, on: bool) -> bool:
        """AMX on or off (off: the VNNI path for every row, the same outputs); whether calls now use it."""
        self.amx = bool(self._amx(int(on)))
        return self.amx

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 out_features: int, kind: int, swiglu: bool = False) -> torch.Tensor:  # fmt: skip
        """x (..., K) -> y (..., N) in x's dtype (computed from fp32 rows); `kind`: the weights' (Q4, Q8, Q8Z).
        With `swiglu` (a fused gate/up product, N = 2 I): silu(gate) * up (..., I), in the product's store."""
        # the decode step's calls (2-D, fp32, contiguous) skip the reshapes: ~150 calls a step, each ~1 us a view
        plain = x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous()
        flat = x if plain else x.reshape(-1, x.shape[-1]).float().contiguous()  # (M, K)
        rows, in_features = flat.shape
        if swiglu and out_features % (2 * TILE):
            raise ValueError(f"SwiGLU in the store needs halves of whole tiles of {TILE}, not {out_features} / 2")
        width = out_features // 2 if swiglu else out_features
        y = torch.empty(rows, width)
        xq, dx, sx, so = self.scratch.get(rows, in_features)
        args = (flat.data_ptr(), rows, in_features, out_features, weights.data_ptr(), scales.data_ptr(),
                None if bias is None else bias.data_ptr(), y.data_ptr(), xq, dx, sx, so, torch.get_num_threads())
        compiled.call(PROFILE_NAME, (self.swiglu_fns if swiglu else self.fns)[kind], *args)
        return y if plain else y.to(x.dtype).reshape(*x.shape[:-1], width)


class Int8GroupLinear(nn.Module):
    """y = x @ W.T + b with W in 8 bits per output and group of 32 inputs on the kernel: the int8 mode's layers,
    and the int4 mode's output layer (in bf16 it reads twice the bytes).

    A weight that the symmetric grid holds exactly (a Q8_0 source: SmolLM2's output layer) stays on it (Q8);
    any other takes a scale and a zero per group (Q8Z), whose 255 levels span the group's own range: a 4-bit
    source is held exactly, and other weights round to a level at least as fine as the symmetric grid's."""

    def __init__(self, weight: torch.Tensor | SourceWeight, bias: torch.Tensor | None,
                 kernel: GroupQuantKernel) -> None:  # fmt: skip
        """`weight`: (N, K) float, rounded here, or a file's levels (any width: numerics/levels.py), as they are."""
        super().__init__()
        self.out_features, self.in_features = weight.shape  # (N, K)
        if not isinstance(weight, torch.Tensor):
            self.kind, self.error, self.padding = (Q8 if weight.symmetric else Q8Z), 0.0, 0
            self.kernel = kernel
            self.packed, self.scales = pack8_levels(weight, self.kind == Q8Z)
            self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)
            return
        # outputs past a whole tile (GPT-2's 50,257-token output layer) take zero rows to the next one; the call
        # computes them and returns the real ones
        self.padding = -self.out_features % TILE
        if self.padding:
            weight = torch.cat([weight.detach().float(), weight.new_zeros(self.padding, self.in_features).float()])
            if bias is not None:
                bias = torch.cat([bias.detach().float(), bias.new_zeros(self.padding).float()])
        q, d, self.error = quantize8(weight)
        if self.error < LOSSLESS_ERROR:
            self.kind, z = Q8, None
            u = (q.to(torch.int16) + 128).to(torch.uint8)  # (N, K)
        else:
            self.kind = Q8Z
            u, d, z, self.error = quantize8_zero(weight)
        self.kernel = kernel
        self.packed, self.scales = pack8(u, d, z)  # (N/16, K/32, 8, 16, 4), (N/16, K/32, [2,] 16)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if self.padding:
            y = self.kernel(x, self.packed, self.scales, self.bias, self.out_features + self.padding, self.kind)
            return y[..., : self.out_features].contiguous()
        return self.kernel(x, self.packed, self.scales, self.bias, self.out_features, self.kind)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N / 2)
        """As a fused gate/up product (gate's N / 2 outputs, then up's): silu(gate) * up, in the product's store."""
        return self.kernel(x, self.packed, self.scales, self.bias, self.out_features, self.kind, swiglu=True)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.kind == Q8 else "with zeros"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 g{GROUP} {kind} x int8 "
                f"(error {self.error:.3f} levels)")  # fmt: skip


def usable(features: set[str]) -> bool:
    """Whether this kernel runs here: the CPU (as `features` names it) has the instructions, and it builds."""
    return any(all(f in features for f in isa) for isa in NEEDS) and load() is not None


@cache
def load() -> GroupQuantKernel | None:
    """The kernel, built if needed; None where it cannot run (then int4 layers take PyTorch's kernel)."""
    return compiled.load("group_quant.c", "group-quantized x int8 kernel", GroupQuantKernel)
