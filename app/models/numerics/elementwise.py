"""The elementwise work between the matrix products in C (kernels/elementwise.c): RMSNorm (GPT-2: LayerNorm) with
its residual add, rotary with the q/k/v split, SwiGLU (GPT-2: GELU). One call each where the model's modules run
a dozen torch ops (see the C file's note).

Used only where the model runs the int4 x int8 kernel (app/models/numerics/group_quant.py): that mode is not
token-exact against transformers anyway, and these loops reorder sums (-ffast-math). There the decode step
(app/models/layers/decode_step.py) calls them directly, and `install` swaps the model's RMSNorm and SwiGLU modules for
ones that call them, so prompts (transformers' forward) use them too. The fp32 mode keeps the modules' own ops,
bit for bit. One op here is exact and serves every CPU mode: `argmax` (greedy decoding's pick: no arithmetic,
the first index of each row's largest value, as torch's).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.models.kernels import compiled
from app.models.numerics import group_quant
from app.models.numerics.fusion import fused_product
from app.models.numerics.group_quant import Int8GroupLinear
from app.models.numerics.int4 import Int4Linear


class Elementwise:
    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self._norm = lib.add_rms_norm
        self._norm.argtypes = [p, p, p, f, i, i, p, i]
        self._rope = lib.rope_split
        self._rope.argtypes = [p, p, p, i, i, i, i, p, p, p, i]
        self._swiglu = lib.silu_mul
        self._swiglu.argtypes = [p, i, i, p, i]
        self._argmax = lib.argmax_rows
        self._argmax.argtypes = [p, i, i, p, i]
        self._layer_norm = lib.add_layer_norm
        self._layer_norm.argtypes = [p, p, p, p, f, i, i, p, i]
        self._gelu = lib.gelu_tanh
        self._gelu.argtypes = [p, i, i, i]
        for fn in (self._norm, self._rope, self._swiglu, self._argmax, self._layer_norm, self._gelu):
            fn.restype = None

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:  # fmt: skip
        """x (B, E) contiguous fp32, updated in place to x + residual; returns RMSNorm(x) * weight (B, E)."""
        rows, width = x.shape
        h = torch.empty_like(x)
        self._norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), eps, rows,
                   width, h.data_ptr(), torch.get_num_threads())  # fmt: skip
        return h

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:  # fmt: skip
        """x (B, E) contiguous fp32, updated in place to x + residual; returns LayerNorm(x) * weight + bias (B, E)."""
        rows, width = x.shape
        h = torch.empty_like(x)
        self._layer_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                         bias.data_ptr(), eps, rows, width, h.data_ptr(), torch.get_num_threads())  # fmt: skip
        return h

    def gelu(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, N) contiguous fp32 -> gelu(y) in its tanh form (GPT-2's gelu_new), in place."""
        rows, width = y.shape
        self._gelu(y.data_ptr(), rows, width, torch.get_num_threads())
        return y

    def rope_split(self, y: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, q_heads: int,
                   kv_heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """y (B, (Hq + 2 Hkv) D), cos and sin (B, D) -> q (B, Hq, D), k (B, Hkv, D) rotated, v (B, Hkv, D); cos and
        sin None: the three split, unrotated (GPT-2)."""
        rows = y.shape[0]
        q = y.new_empty(rows, q_heads, dim)
        k = y.new_empty(rows, kv_heads, dim)
        v = y.new_empty(rows, kv_heads, dim)
        self._rope(y.data_ptr(), None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
                   rows, q_heads, kv_heads, dim, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                   torch.get_num_threads())  # fmt: skip
        return q, k, v

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """x (R, V) contiguous fp32 on the CPU -> (R,) int64: each row's first index of its largest value (as
        torch.argmax)."""
        rows, width = x.shape
        out = torch.empty(rows, dtype=torch.int64)
        self._argmax(x.data_ptr(), rows, width, out.data_ptr(), torch.get_num_threads())
        return out

    def silu_mul(self, g: torch.Tensor) -> torch.Tensor:
        """g (B, 2 I) -> silu(g[:, :I]) * g[:, I:] (B, I)."""
        rows, width = g.shape
        m = g.new_empty(rows, width // 2)
        self._swiglu(g.data_ptr(), rows, width // 2, m.data_ptr(), torch.get_num_threads())
        return m


def swiglu_in_store(gate_up: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """h (M, E) -> silu(gate) * up (M, I) of a fused gate/up product (M, 2 I) in the product's own store, where it
    runs the group-quantized kernel and each half is whole tiles; else None. Against the product and then
    `Elementwise.silu_mul`: one pass over the (M, 2 I) sums fewer (8-9% of a 32-row SmolLM2 gate/up layer, 1.5-3.5%
    at 277 rows, where the store's exp and division cost most of what the pass did), with the kernel's own exp,
    the same on AVX-512 and AVX2."""
    if isinstance(gate_up, Int8GroupLinear) or (isinstance(gate_up, Int4Linear) and gate_up.kernel is not None):
        return gate_up.swiglu if gate_up.out_features % (2 * group_quant.TILE) == 0 else None
    return None


def swiglu_product(gate_up: nn.Module, ops: Elementwise) -> Callable[[torch.Tensor], torch.Tensor]:
    """h (M, E) -> silu(gate) * up (M, I): in the product's store where it can be (`swiglu_in_store`), else
    `ops.silu_mul` after the product."""
    return swiglu_in_store(gate_up) or (lambda h: ops.silu_mul(gate_up(h)))


@cache
def load() -> Elementwise | None:
    """The ops, built if needed; None without a compiler (then the step runs the modules' own ops)."""
    return compiled.load("elementwise.c", "elementwise ops", Elementwise, extra_flags=("-ffast-math",),
                             libs=("-lmvec",))  # fmt: skip


class RMSNorm(nn.Module):
    """LlamaRMSNorm through `Elementwise.add_rms_norm`; keeps `weight` and `variance_epsilon`."""

    def __init__(self, norm: Any, ops: Elementwise) -> None:
        super().__init__()
        self.weight: torch.Tensor = norm.weight
        self.variance_epsilon = float(norm.variance_epsilon)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., E) -> (..., E)
        rows = x.reshape(-1, x.shape[-1])
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.float().contiguous()
        return self.ops.add_rms_norm(rows, None, self.weight, self.variance_epsilon).view(x.shape).to(x.dtype)


class SwiGLU(nn.Module):
    """LlamaMLP (down(silu(gate(x)) * up(x))) with gate/up as one product, SwiGLU in its store where it runs the
    group-quantized kernel (`swiglu_product`), else `Elementwise.silu_mul`; keeps the members (`gate_proj`,
    `up_proj`, `down_proj`) so code that reads them still finds them."""

    def __init__(self, mlp: Any, gate_up: nn.Module, ops: Elementwise) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.gate_up: nn.Module = gate_up
        self.ops = ops
        self.fused = swiglu_in_store(gate_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., E) -> (..., E)
        rows = x.reshape(-1, x.shape[-1])
        if self.fused is not None:
            m = self.fused(rows.float())  # (M, I) fp32, as silu_mul gives
        else:
            g = self.gate_up(rows)  # (M, 2 I)
            if g.dtype != torch.float32 or not g.is_contiguous():
                g = g.float().contiguous()
            m = self.ops.silu_mul(g)
        out: torch.Tensor = self.down_proj(m)  # (M, E)
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def install(model: nn.Module) -> int:
    """Swap `model`'s RMSNorm and fused-SwiGLU MLP modules (Llama's, and Qwen2's, the same) for the C ones; how
    many it swapped."""
    ops = load()
    if ops is None:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, module in list(parent.named_children()):
            child: Any = module
            kind = type(child).__name__
            if kind in ("LlamaRMSNorm", "Qwen2RMSNorm"):
                setattr(parent, name, RMSNorm(child, ops))
                swapped += 1
            elif kind in ("LlamaMLP", "Qwen2MLP") and getattr(child.config, "hidden_act", None) == "silu":
                gate_up = fused_product([child.gate_proj, child.up_proj])
                if gate_up is not None:
                    setattr(parent, name, SwiGLU(child, gate_up, ops))
                    swapped += 1
    return swapped
