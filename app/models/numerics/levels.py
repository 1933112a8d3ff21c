"""Weights as a quantized file holds them: integer levels with a scale and an offset per output and group of 32
inputs, w = (u - off) * d + z. The group-quantized kernel's kinds are such levels (Q4: u in [0, 15] with bf16 d and
z; Q8 / Q8Z: u in [0, 255] with fp32 d and z), so a file's blocks reach the kernel without a float copy of the
model, and where the file's type is such a group form (GGUF Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q8_0) its levels
are the file's own.

`SourceLinear` stands in for a linear layer whose weight is still in the file: `modes.apply` replaces it with a
kernel built from its levels (int4 / int8 on our kernel), or with a float layer from its dequantized weight (fp32,
bf16). A weight is read from the file only then, one layer or fused group at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

GROUP = 32
# GGUF Q4_K's own scales: D, Dmin (N, K / 256) fp16, sc, m (N, K / 32) uint8, with d = D sc and z = -Dmin m
Q4KScales = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Levels:
    """w[n, k] = (u[n, k] - off) * d[n, k // 32] + z[n, k // 32] (z None: 0), computed in fp32 in that order (the
    order GGUF's own dequantization uses, so `dequantize` gives its values bit for bit). `bits`: u's range, [0, 2^bits).
    `exact`: the levels are the file's own (False: a type without a group-32 form, rounded to 8 bits here)."""

    u: torch.Tensor  # (N, K) uint8
    off: int
    d: torch.Tensor  # (N, K / 32) fp32
    z: torch.Tensor | None  # (N, K / 32) fp32
    bits: int
    exact: bool = True
    k: Q4KScales | None = None  # where they are a Q4_K's: d and z as it holds them (the kernel's exact Q4K kind)

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.u.shape
        return n, k

    def dequantize(self) -> torch.Tensor:
        """(N, K) fp32."""
        n, k = self.u.shape
        w = (self.u.reshape(n, k // GROUP, GROUP).float() - self.off) * self.d.unsqueeze(-1)  # (N, G, 32)
        if self.z is not None:
            w = w + self.z.unsqueeze(-1)
        return w.reshape(n, k)

    def as_eight_bits(self) -> Levels:
        """The same weights with u in [0, 255] and off 128 (the kernel's Q8 / Q8Z form): u shifted, d and z as
        they are, so every weight is the same number."""
        if self.bits == 8 and self.off == 128:
            return self
        shift = 128 - self.off
        assert shift >= 0 and (1 << self.bits) - 1 + shift <= 255, f"levels of {self.bits} bits, offset {self.off}"
        return Levels((self.u.to(torch.int16) + shift).to(torch.uint8), 128, self.d, self.z, 8, self.exact)

    def four_bit_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q (N, K) int32 in [0, 15] and the Q4 kind's scales and zeros (K / 32, N, 2) bf16: w = (q - 8) d + z.
        bf16 holds d and z to 8 significant bits (a Q4_K scale d * sc needs up to 17): the kernel's rounding."""
        assert self.bits == 4
        zero = (8 - self.off) * self.d + (0 if self.z is None else self.z)  # the kernel takes q - 8
        scales_zeros = torch.stack([self.d, zero], dim=-1).to(torch.bfloat16).transpose(0, 1).contiguous()
        return self.u.to(torch.int32), scales_zeros


def concat(parts: list[Levels]) -> Levels:
    """Levels of the outputs of `parts`, one after another (a fused product): in their common form, 4 bits where
    every part is 4 bits with the same offset, else 8 (a 4-bit part widened without change of value)."""
    four = all(p.bits == 4 and p.off == parts[0].off for p in parts)
    widened = parts if four else [p.as_eight_bits() for p in parts]
    zs = [p.z for p in widened]
    z = None if all(x is None for x in zs) else torch.cat([x if x is not None else torch.zeros_like(p.d)
                                                          for x, p in zip(zs, widened, strict=True)])  # fmt: skip
    ks = [p.k for p in widened]
    k = None if any(x is None for x in ks) else tuple(torch.cat(t) for t in zip(*ks, strict=True))
    return Levels(torch.cat([p.u for p in widened]), widened[0].off, torch.cat([p.d for p in widened]), z,
                  widened[0].bits, all(p.exact for p in widened), k)  # type: ignore[arg-type]  # fmt: skip


class SourceWeight(Protocol):
    """A weight (N, K) still in its file."""

    shape: tuple[int, int]

    @property
    def bits(self) -> int | None:
        """Of its levels (4 for Q4_0 / Q4_1 / Q4_K, 5, 8); None for a float type (F32, F16, BF16)."""

    @property
    def symmetric(self) -> bool:
        """Its levels have no z."""

    @property
    def q4k(self) -> bool:
        """Its levels carry Q4_K's own scales (`Levels.k`) in every chunk."""

    def dense(self) -> torch.Tensor:
        """(N, K) fp32: the file's own dequantization."""

    def chunks(self) -> Iterator[Levels]:
        """Its levels in a group-32 form, a few rows at a time (all of them in order): a layer is never held
        unpacked whole (a 151,936-row output layer's 8-bit levels are 233 MB)."""


def tiles(chunks: Iterator[Levels], tile: int = 16) -> Iterator[tuple[int, Levels]]:
    """(first row, levels) of `chunks` regrouped so that each starts at a multiple of `tile` rows and all but the
    last hold whole tiles (the kernel's layout is per tile of 16 outputs)."""
    row, held = 0, list[Levels]()
    for chunk in chunks:
        held.append(chunk)
        rows = sum(c.shape[0] for c in held)
        if rows % tile == 0:
            yield row, held[0] if len(held) == 1 else concat(held)
            row, held = row + rows, []
    if held:
        yield row, held[0] if len(held) == 1 else concat(held)


class SourceLinear(nn.Module):
    """A linear layer whose weight is still in the file (module docstring). Its forward gives zeros of the output's
    shape: it runs only in the shape probe that finds the layers sharing an input (fusion.find_groups), and every
    one is replaced before the model computes anything."""

    def __init__(self, weight: SourceWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.source = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        return x.new_zeros(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, in the file"


class LevelsEmbedding(nn.Module):
    """An embedding table held as the file's levels (4 bits two to a byte, or 8), each looked-up row dequantized
    as the file's own dequantization does: a quarter or less of fp32's bytes, the same vectors. A Q4_K table keeps
    its own scales (`Levels.k`: 2.5 bytes a group of 32 against fp32 d and z's 8; Qwen2.5-1.5B's 175 -> 135 MB).
    `scale`: a factor the model's own embedding multiplies by (Gemma's sqrt(hidden))."""

    def __init__(self, source: SourceWeight, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        assert source.bits is not None
        self.num_embeddings, self.embedding_dim = v, k = source.shape
        self.bits, self.off = (4, 0) if source.bits == 4 else (8, 128)  # one type per tensor: one offset (below)
        # buffers: they move with the model (.to(device)); not saved (the file holds them)
        self.u: torch.Tensor
        self.register_buffer("u", torch.empty(v, k // 2 if self.bits == 4 else k, dtype=torch.uint8), persistent=False)
        self.q4k = source.bits == 4 and source.q4k
        groups = k // GROUP
        # Q4_K: D, Dmin (V, K / 256) fp16 and sc, m (V, K / 32) uint8; else d and z (V, K / 32) fp32
        shapes = ([("D", (v, groups // 8), torch.float16), ("Dmin", (v, groups // 8), torch.float16),
                   ("sc", (v, groups), torch.uint8), ("m", (v, groups), torch.uint8)] if self.q4k
                  else [("d", (v, groups), torch.float32),
                        *([] if source.symmetric else [("z", (v, groups), torch.float32)])])  # fmt: skip
        self.held = [name for name, _, _ in shapes]
        for name, shape, dtype in shapes:
            self.register_buffer(name, torch.empty(shape, dtype=dtype), persistent=False)
        row = 0
        for chunk in source.chunks():
            rows = chunk.shape[0]
            levels = chunk if self.bits == 4 else chunk.as_eight_bits()
            u = levels.u
            self.off = levels.off
            self.u[row : row + rows] = (u[:, 0::2] | (u[:, 1::2] << 4)) if self.bits == 4 else u
            assert levels.k is not None or not self.q4k
            zero = levels.z if levels.z is not None else 0
            parts = levels.k if levels.k is not None and self.q4k else (levels.d, zero)
            for name, part in zip(self.held, parts, strict=False):  # d alone where there is no z
                getattr(self, name)[row : row + rows] = part
            row += rows
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., K) fp32
        flat = ids.reshape(-1)
        rows = self.u.index_select(0, flat)  # (M, K / 2) or (M, K)
        if self.bits == 4:
            rows = torch.stack([rows & 15, rows >> 4], dim=-1).reshape(flat.shape[0], -1)  # (M, K)
        held = {name: getattr(self, name).index_select(0, flat) for name in self.held}
        if self.q4k:  # d = D sc, z = -(Dmin m) in fp32: the numbers the file's own dequantization forms
            d = held["D"].float().repeat_interleave(8, dim=1) * held["sc"].float()
            z: torch.Tensor | None = -(held["Dmin"].float().repeat_interleave(8, dim=1) * held["m"].float())
        else:
            d, z = held["d"], held.get("z")
        w = Levels(rows, self.off, d, z, self.bits).dequantize()  # (M, K)
        if self.scale is not None:
            w = w * self.scale.to(w.dtype)
        return w.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.bits}-bit levels"


# a linear layer's weight: (N, K) float, or still in the file
Weight = torch.Tensor | SourceWeight


def dense(weight: Weight) -> torch.Tensor:
    """(N, K) float: the tensor itself, or the file's dequantization."""
    return weight if isinstance(weight, torch.Tensor) else weight.dense()


class Stacked:
    """Several file weights' outputs one after another (a fused product's weight), still in the file."""

    def __init__(self, parts: list[SourceWeight]) -> None:
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
        bits = [p.bits for p in parts]
        self.bits = None if None in bits else 4 if all(b == 4 for b in bits) else 8
        self.symmetric = all(p.symmetric for p in parts)
        self.q4k = self.bits == 4 and all(p.q4k for p in parts)

    def dense(self) -> torch.Tensor:
        return torch.cat([p.dense() for p in self.parts])

    def chunks(self) -> Iterator[Levels]:
        for part in self.parts:
            yield from part.chunks()


def stack(weights: list[Weight]) -> Weight:
    """The weight of a product computing each of `weights`' outputs in turn: in the file while all are."""
    if all(isinstance(w, torch.Tensor) for w in weights):
        return torch.cat([w.detach() for w in weights if isinstance(w, torch.Tensor)])
    if all(not isinstance(w, torch.Tensor) for w in weights):
        return Stacked([w for w in weights if not isinstance(w, torch.Tensor)])
    return torch.cat([dense(w).detach() for w in weights])


def materialize(model: nn.Module) -> int:
    """Replace every SourceLinear of `model` with an nn.Linear of its dequantized weight (fp32): the stock model, and
    the paths that start from float weights; return how many."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, SourceLinear)]  # fmt: skip
    for parent, name, child in found:
        layer = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
        layer.weight = nn.Parameter(child.source.dense(), requires_grad=False)
        if child.bias is not None:
            layer.bias = nn.Parameter(child.bias.detach().float(), requires_grad=False)
        setattr(parent, name, layer)
    return len(found)
