"""Numeric modes of the linear layers on CPU, chosen at load by what the CPU has.

| mode | linear layers | activations, norms, attention, KV cache |
|---|---|---|
| fp32 | fp32, prepacked for oneDNN (app/models/packing.py) | fp32 |
| bf16 | bf16 weights, prepacked; inputs cast to bf16, outputs back to fp32 | fp32 |
| int8 | int8 weights per output channel, activations per row, int32 sums, SmoothQuant (app/models/int8.py) | fp32 |

Only the matrix products change: PyTorch's bf16 norms and attention are slower than fp32 on this CPU (a
stock `model.to(bfloat16)` decode step is slower than fp32), and they are a small part of the work. In
bf16 and int8 the layers that read one input (q/k/v, gate/up) run as one product (app/models/fusion.py).
Every mode gives each row the same result whatever other rows share the step.

A fast mode runs only where the CPU has the instructions for it (avx512_bf16 or AMX for bf16;
avx512_vnni, avx_vnni or AMX for int8); elsewhere the model runs in fp32 and one log line says why.
Nothing outside app/models knows which mode runs, except what /info and /metrics report (`Numerics.name`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from app.models.calibration import calibration_ids, input_ranges, smoothing
from app.models.fusion import as_linear, find_groups, fuse, linear_layers
from app.models.int8 import Int8Linear
from app.models.packing import PackedLinear, own_memory, pack_linears

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BF16_FEATURES = ("avx512_bf16", "amx_bf16")
INT8_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")

# What TEXTGEN_DTYPE=auto (with TEXTGEN_QUANTIZE=auto) runs on a CPU, first that the CPU has: each mode's
# WikiText-2 perplexity is within 1% of fp32's, and bf16 ran W1 fastest here (`textgen bench --compare
# --systems engine --modes fp32,bf16,int8`: 167.7 / 227.0 / 210.5 tokens/s; one stream 20.3 / 32.4 / 32.7).
# int8 comes next: on a CPU with VNNI but without avx512_bf16 it still runs most products in int8.
AUTO_CPU_ORDER = ("bf16", "int8", "fp32")


@dataclass(frozen=True)
class Numerics:
    """What runs the model's products: `name` is what the log, /info and /metrics show."""

    name: str  # e.g. "int8-w8a8-per-row", "bf16-packed", "fp32-packed", "fp32", "cuda-bfloat16"
    mode: str  # "fp32" | "bf16" | "int8" on CPU; the dtype's name otherwise
    load_dtype: torch.dtype  # dtype the model is loaded (and its activations run) in
    fallback: str | None = None  # why a faster mode that was asked for does not run
    wide_bf16: bool = False  # int8 mode: the layers kept out of int8 run in bf16 (else fp32)


def cpu_features(override: str | None = None) -> set[str]:
    """The CPU's instruction-set features (torch's cpuinfo names: avx512_vnni, avx512_bf16, amx_int8, ...)."""
    if override is not None:  # TEXTGEN_CPU_FEATURES: to see (and test) what another CPU would run
        return {f.strip() for f in override.split(",") if f.strip()}
    return {name for name, value in torch.cpu.get_capabilities().items() if value is True}


def _has(features: set[str], wanted: tuple[str, ...]) -> bool:
    return any(f in features for f in wanted)


def choose(
    device: torch.device, dtype: str, quantize: str, pack_weights: bool, features: set[str],
    gpu_dtype: torch.dtype | None = None,
) -> Numerics:  # fmt: skip
    """The numeric mode for the settings TEXTGEN_DTYPE (`dtype`), TEXTGEN_QUANTIZE (`quantize`) and
    TEXTGEN_PACK_WEIGHTS on this device and CPU."""
    names = DTYPES
    if device.type != "cpu":
        load = names[dtype] if dtype != "auto" else (gpu_dtype or torch.float16)
        why = "int8 is a CPU mode; the GPU runs its dtype" if quantize == "int8" else None
        return Numerics(f"{device.type}-{str(load).removeprefix('torch.')}", str(load).removeprefix("torch."),
                        load, why)  # fmt: skip
    if not pack_weights:  # the stock transformers model: baselines and references
        load = names.get(dtype, torch.float32)
        return Numerics(str(load).removeprefix("torch."), str(load).removeprefix("torch."), load)
    if dtype == "float16":
        return Numerics("float16", "float16", torch.float16)
    usable = {"int8": _has(features, INT8_FEATURES), "bf16": _has(features, BF16_FEATURES), "fp32": True}
    need = {"int8": " or ".join(INT8_FEATURES), "bf16": " or ".join(BF16_FEATURES)}
    if quantize == "int8" or dtype != "auto":  # asked for one mode: that one, or fp32 and why not
        mode = "int8" if quantize == "int8" else {"bfloat16": "bf16", "float32": "fp32"}[dtype]
        fallback = None
        if not usable[mode]:
            fallback = f"{mode} needs {need[mode]}, which this CPU does not have; running fp32"
            mode = "fp32"
    else:  # auto: the fastest mode this CPU has (quantize=none: no int8)
        order = [m for m in AUTO_CPU_ORDER if quantize == "auto" or m != "int8"]
        mode = next(m for m in order if usable[m])
        fallback = None
        if mode == "fp32":
            fallback = f"this CPU has neither {need['int8']} (int8) nor {need['bf16']} (bf16); running fp32"
    wide_bf16 = mode == "int8" and usable["bf16"] and dtype != "float32"
    names_by_mode = {"fp32": "fp32-packed", "bf16": "bf16-packed",
                     "int8": f"int8-w8a8-per-row+{'bf16' if wide_bf16 else 'fp32'}"}  # fmt: skip
    return Numerics(names_by_mode[mode], mode, torch.float32, fallback, wide_bf16)


def keeps_int8(group: list[nn.Module], weight: torch.Tensor, output_layer: nn.Module | None) -> bool:
    """Whether a layer (or fused group) runs in int8 in the int8 mode. Two kinds stay in bf16 (fp32 without
    avx512_bf16), measured on SmolLM2, WikiText-2 valid, 40 x 512 tokens, fp32 20.241:
    - the output layer: plain int8 costs +3.8% perplexity (its input, the final norm's output, has a few
      channels of range ~50 against ~5 for the rest).
    - projections down to a smaller width (K > N: the MLP's down_proj / GPT-2's mlp.c_proj), whose input is
      the MLP's activation product: int8 everywhere else +0.48%, with them +1.40% (SmoothQuant alpha 0.5-1.0
      did not help them).
    Both can be int8 at a small cost when their largest input channels (8 for the output layer, 16 for the
    down projections, a fixed set found at calibration) are computed in fp32 on their own (LLM.int8()'s
    decomposition): all int8 +0.81%. But that ran W1 *slower* here (in-process engine, two runs each:
    149 / 155 tokens/s against 167 / 168 with these layers in bf16): `_int_mm` at the engine's odd row
    counts and the extra outlier product cost more than bf16's prepacked kernels save. So they stay bf16."""
    out_features, in_features = weight.shape
    return all(layer is not output_layer for layer in group) and in_features <= out_features


def apply(model: Any, tokenizer: Any, numerics: Numerics) -> None:
    """Put `model` (loaded in fp32 on the CPU) into `numerics`' mode, in place."""
    if numerics.mode not in ("fp32", "bf16", "int8") or not torch.backends.mkldnn.is_available():
        return
    if numerics.mode == "fp32":
        pack_linears(model)
        return
    started = time.perf_counter()
    layers = [layer for _, _, layer in linear_layers(model)]
    groups = find_groups(model, layers)
    grouped = {id(layer) for g in groups for layer in g}
    singles = [(parent, name, layer) for parent, name, layer in linear_layers(model) if id(layer) not in grouped]
    wide = torch.bfloat16 if numerics.mode == "bf16" or numerics.wide_bf16 else torch.float32
    output_layer = model.get_output_embeddings()
    ranges = input_ranges(model, layers, calibration_ids(tokenizer)) if numerics.mode == "int8" else {}
    int8 = 0

    def make(group: list[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        nonlocal int8
        if numerics.mode == "int8" and keeps_int8(group, weight, output_layer):
            int8 += len(group)
            # members of a group read the same input, so they saw the same ranges
            return Int8Linear(weight, bias, smooth=smoothing(ranges[id(group[0])], weight))
        return PackedLinear(weight, bias, dtype=wide)

    for parent, name, layer in singles:
        weight, bias = as_linear(layer)  # type: ignore[misc]
        setattr(parent, name, make([layer], weight, bias))
    fuse(model, groups, make)
    own_memory(model)
    log.info("numerics %s: %d linear layers (%d int8), %d of them fused into %d products, in %.1fs", numerics.name,
             len(layers), int8, sum(len(g) for g in groups), len(groups), time.perf_counter() - started)  # fmt: skip
