"""A decode step's layers in one C call (kernels/decode_layers.c), where every product runs the group-quantized
kernel and attention the ragged C kernel: Llama's block (Qwen2's too) and GPT-2's.

The written-out step (app/models/layers/decode_step.py) calls ~9 kernels a layer from Python; at one row each
call costs ~10-15 us in argument conversion and allocation, about as much as the arithmetic of a SmolLM2 step.
This module hands the same kernels, as function pointers, to a C loop over the layers: the same calls in the
same order on the same buffers, so the logits are the Python loop's bit for bit
(tests/models/layers/test_decode_step.py).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.models.kernels import compiled
from app.models.layers import ragged_attention
from app.models.numerics import elementwise, group_quant
from app.models.numerics.group_quant import Int8GroupLinear
from app.models.numerics.int4 import Int4Linear

SOURCE = "decode_layers.c"
PRODUCTS = 4  # q/k/v, o, gate/up (GPT-2: c_fc), down: the C file's order
# a norm's (weight, bias or None, epsilon): RMSNorm's or LayerNorm's
Norm = tuple[torch.Tensor, torch.Tensor | None, float]
# (the ragged kernel, the step's plan, keys and values per layer): what a step's cache lends the C loop
Ragged = tuple[
    ragged_attention.DecodeAttentionKernel, ragged_attention.DecodeJobs, list[torch.Tensor], list[torch.Tensor]
]


def _address(fn: Any) -> int:
    return int(ctypes.cast(fn, ctypes.c_void_p).value or 0)


@cache
def _load() -> Any:
    def bind(path: Path) -> Any:
        fn = ctypes.CDLL(str(path)).decode_layers
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        fn.argtypes = [p, i, p, p, p, p, *[i] * 7, p, p, p, p, f, i, p, p, p, i, *[p] * 9, i, i, p]
        fn.restype = None
        return fn

    return compiled.load(SOURCE, "decode layers loop", bind)


def _product(module: Any) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, int, int] | None:
    """(kind, weights, scales, bias, K, N) of a product the kernel runs, or None."""
    if isinstance(module, Int4Linear) and module.kernel is not None:
        return module.kind, module.packed, module.scales_zeros, module.bias, module.in_features, module.out_features
    if isinstance(module, Int8GroupLinear) and not module.padding:
        return module.kind, module.packed, module.scales, module.bias, module.in_features, module.out_features
    return None


def norm_of(module: Any) -> Norm:
    """(weight, bias, epsilon) of an RMSNorm (ours or transformers') or a LayerNorm."""
    if isinstance(module, nn.LayerNorm):
        return module.weight, module.bias, float(module.eps)
    return module.weight, None, float(module.variance_epsilon)


class NativeLayers:
    """`(x, h, cos, sin, ragged) -> h`: every layer of the step, x (B, E) updated in place, h (B, E) the first
    layer's normed input in and the final norm's output out."""

    def __init__(self, fn: Any, ops: elementwise.Elementwise, kernel: group_quant.GroupQuantKernel,
                 products: list[list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, int, int]]],
                 norms: list[tuple[Norm, Norm]], shape: tuple[int, int, int, int, int],
                 gpt2: bool) -> None:  # fmt: skip
        self.fn = fn
        self.kernel = kernel
        self.shape = shape  # E, HQ, HKV, D, I
        self.gpt2 = gpt2
        self.layers = len(products)
        self.keep = [t for row in products for _, w, s, b, _, _ in row for t in (w, s, b) if t is not None]
        ptrs, dims, eps = [], [], []
        for row, pair in zip(products, norms, strict=True):
            for kind, w, s, b, k, n in row:
                ptrs += [w.data_ptr(), s.data_ptr(), 0 if b is None else b.data_ptr()]
                dims += [kind, k, n]
            for weight, bias, epsilon in pair:
                ptrs += [weight.data_ptr(), 0 if bias is None else bias.data_ptr()]
                eps.append(epsilon)
                self.keep += [t for t in (weight, bias) if t is not None]
        self.ptrs = torch.tensor(ptrs, dtype=torch.int64)
        self.dims = torch.tensor(dims, dtype=torch.int32)
        self.eps = torch.tensor(eps, dtype=torch.float32)
        self.most_n = max(n for row in products for *_, n in row)
        self.most_k = max(k for row in products for *_, k, _ in row)
        # seconds of linears, attention and elementwise work inside the loop, added to while set (profiles)
        self.times: torch.Tensor | None = None
        kinds = (group_quant.Q4, group_quant.Q8, group_quant.Q8Z)
        self.fns = [*(_address(kernel.fns[kind]) for kind in kinds), _address(ops._norm), _address(ops._rope),
                    *(_address(kernel.swiglu_fns[kind]) for kind in kinds)]  # the C file's order
        # after the attention kernel's: GPT-2's ops, then the Q4K kind's product and its SwiGLU
        self.fns_after = [_address(ops._layer_norm), _address(ops._gelu), _address(kernel.fns[group_quant.Q4K]),
                          _address(kernel.swiglu_fns[group_quant.Q4K])]  # fmt: skip
        self._table: tuple[Any, torch.Tensor] | None = None  # (the attention kernel's function, the table with it)

    def __call__(self, x: torch.Tensor, h: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                 scale: float, ragged: Ragged) -> torch.Tensor:  # fmt: skip
        attention, plan, keys, values = ragged
        rows = x.shape[0]
        width, hq, hkv, dim, inner = self.shape
        if self._table is None or self._table[0] is not attention.fn:  # the same kernel every step: built once
            table = [*self.fns, _address(attention.fn), *self.fns_after]
            self._table = (attention.fn, torch.tensor(table, dtype=torch.int64))
        fns = self._table[1]
        kv = torch.tensor([t.data_ptr() for pair in zip(keys, values, strict=True) for t in pair], dtype=torch.int64)
        work = torch.empty(rows * (self.most_n + 2 * hq * dim + 2 * hkv * dim + inner))
        xq, dx, sx, so = self.kernel.scratch.get(rows, self.most_k)
        pm, pl, pacc = plan.scratch(hq, dim)
        self.fn(fns.data_ptr(), self.layers, self.ptrs.data_ptr(), self.dims.data_ptr(), self.eps.data_ptr(),
                kv.data_ptr(), rows, width, hq, hkv, dim, inner, self.most_n, x.data_ptr(), h.data_ptr(),
                None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(), scale,
                keys[0].shape[1], plan.held.data_ptr(), plan.starts.data_ptr(), plan.jobs.data_ptr(), plan.njobs,
                plan.first.data_ptr(), pm.data_ptr(), pl.data_ptr(), pacc.data_ptr(), work.data_ptr(), xq, dx, sx, so,
                torch.get_num_threads(), int(self.gpt2),
                None if self.times is None else self.times.data_ptr())  # fmt: skip
        return h


def build(layers: list[list[Any]], norms: list[tuple[Any, Any]], scales: set[float], ops: elementwise.Elementwise,
          shape: tuple[int, int, int, int, int], gpt2: bool = False) -> NativeLayers | None:  # fmt: skip
    """The C loop over these layers, each given as its four products (q/k/v, o, gate/up or GPT-2's c_fc, down) and
    its two norms (after attention, and the next layer's input norm or the final norm), or None where a product
    is not the kernel's or the loop does not build. Llama's gate/up must take SwiGLU in its store."""
    kernel = group_quant.load()
    if kernel is None or len(scales) != 1:
        return None
    products = []
    for modules in layers:
        row = [_product(m) for m in modules]
        if any(p is None for p in row) or (not gpt2 and elementwise.swiglu_in_store(modules[2]) is None):
            return None
        products.append([p for p in row if p is not None])
    fn = _load()
    if fn is None:
        return None
    pairs = [(norm_of(post), norm_of(after)) for post, after in norms]
    return NativeLayers(fn, ops, kernel, products, pairs, shape, gpt2)
