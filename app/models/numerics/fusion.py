"""Linear layers that read the same input, computed as one matrix product.

Llama-style blocks call q_proj, k_proj and v_proj on the same hidden states, then gate_proj and up_proj on
the same normed states. At decode sizes each call is small (SmolLM2's k/v projections are 576 -> 192),
and every call pays its own overhead (and, in int8, its own quantization of the input). One product over
the concatenated weights costs about the same time as its largest member.

Which layers share an input is read off the model, not guessed from names: `find_groups` runs one short
forward with hooks and groups the layers that received the very same tensor. Each member is then
replaced by a `FusedMember`; the first member called computes the whole product for that input, the
others take their slice of it. Correctness never depends on the call order: a member called with a
tensor other than the one the product was computed for starts a new product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from app.models.numerics.levels import SourceLinear, Weight, stack

# (weight (N, K), bias (N,) or None) of a linear layer; the weight may still be in its file (numerics/levels.py)
WeightBias = tuple[Weight, torch.Tensor | None]


def as_linear(module: nn.Module) -> WeightBias | None:
    """(weight (N, K), bias) of a linear-like layer, or None."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if isinstance(module, SourceLinear):
        return module.source, module.bias
    # GPT-2's Conv1D is a linear layer with its weight stored transposed, (K, N)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = cast(torch.Tensor, module.weight)  # (K, N)
        bias = cast("torch.Tensor | None", module.bias)
        return weight.t().contiguous(), bias
    return None


def linear_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, layer) for every linear-like layer of `model`."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if as_linear(child) is not None]  # fmt: skip


def find_groups(model: Any, layers: list[nn.Module]) -> list[list[nn.Module]]:
    """Groups (in call order, two or more each) of `layers` that receive the same input tensor in a forward."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append((module, args[0]))

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            model(input_ids=torch.tensor([[1, 2, 3]], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[nn.Module]] = []
    inputs: list[torch.Tensor] = []
    for module, x in seen:
        for group, first in zip(groups, inputs, strict=True):
            if x is first:
                if module not in group:
                    group.append(module)
                break
        else:
            groups.append([module])
            inputs.append(x)
    return [g for g in groups if len(g) > 1]


class SharedProduct:
    """The fused product of one group for the input it was last called with (not a module: owned by members)."""

    def __init__(self, kernel: nn.Module, widths: list[int]) -> None:
        self.kernel = kernel
        self.bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._served: set[int] = set()

    def slice(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input or index in self._served or self._output is None:
            self._input, self._output, self._served = x, self.kernel(x), set()
        self._served.add(index)
        out = self._output[..., self.bounds[index] : self.bounds[index + 1]]  # (..., N_index), a view
        if len(self._served) == len(self.bounds) - 1:
            self._input = self._output = None  # every member has its part: hold no activations between calls
        return out


class FusedMember(nn.Module):
    """One layer of a fused group: its slice of the group's product."""

    def __init__(self, shared: SharedProduct, index: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.shared = shared
        self.index = index
        self.in_features, self.out_features = in_features, out_features
        if index == 0:
            self.kernel = shared.kernel  # registered once, so the group's weights show in the module tree once

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N_index)
        return self.shared.slice(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused part {self.index}"


# make(layers of a group, weight (sum N, K), bias (sum N,) or None) -> the group's kernel
KernelMaker = Callable[[list[nn.Module], Weight, torch.Tensor | None], nn.Module]


def fuse(model: nn.Module, groups: list[list[nn.Module]], make: KernelMaker) -> int:
    """Replace each group's layers with FusedMembers of one kernel `make(layers, weight (sum N, K), bias)`; return
    how many layers were replaced."""
    where = {id(layer): (parent, name) for parent, name, layer in linear_layers(model)}
    replaced = 0
    for group in groups:
        parts = [as_linear(layer) for layer in group]
        weights = [p[0] for p in parts if p is not None]
        biases = [p[1] for p in parts if p is not None]
        weight = stack(weights)  # (sum N, K)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else torch.zeros(w.shape[0])
                              for w, b in zip(weights, biases, strict=True)])  # fmt: skip
        shared = SharedProduct(make(group, weight, bias), [w.shape[0] for w in weights])
        for i, (layer, w) in enumerate(zip(group, weights, strict=True)):
            parent, name = where[id(layer)]
            setattr(parent, name, FusedMember(shared, i, w.shape[1], w.shape[0]))
            replaced += 1
    return replaced


def fused_product(modules: list[nn.Module]) -> nn.Module | None:
    """The one product that computes all of `modules`, in this order and nothing else; None if there is none."""
    members: list[Any] = modules
    if not all(isinstance(m, FusedMember) for m in members) or len({id(m.shared) for m in members}) != 1:
        return None
    whole = members[0].shared.bounds[-1] == sum(m.out_features for m in members)
    in_order = [m.index for m in members] == list(range(len(members)))
    return members[0].shared.kernel if whole and in_order else None
