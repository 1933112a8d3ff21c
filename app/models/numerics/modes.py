"""Numeric modes of the linear layers on CPU, chosen at load by what the CPU has.

| mode | linear layers | activations, norms, attention, KV cache |
|---|---|---|
| fp32 | fp32, prepacked for oneDNN (app/models/numerics/packing.py) | fp32 |
| bf16 | bf16 weights, prepacked; inputs cast to bf16, outputs back to fp32 | fp32, K/V cached in bf16 |
| int8 | 8-bit weights in groups of 32 x int8 activations (group_quant.py), below | fp32, K/V int8 |
| int4 | 4-bit weights in groups of 32 (Q4_1) x int8 activations (group_quant.py), below | fp32, K/V int8 |

int8 and int4 run our kernel (AVX512-VNNI or AVX2; `Numerics.own_kernel`) for every pass. int8 takes every layer
the kernel can, the output layer and the down projections too: 8-bit weights with a scale and a zero per group
(a symmetric scale where the source is Q8_0 already), activations rounded per row and group of 32, int32 sums.
int4 puts the output layer in Q8_0 on it. Without the kernel (no C compiler), int8 runs oneDNN's int8 product
with one scale per output channel and per row, SmoothQuant, and leaves the output layer and the down
projections in bf16 (app/models/numerics/int8.py); int4 runs PyTorch's int4 kernel on bf16 activations, and a bf16 copy
of the weights for prompt passes where oneDNN has bf16 (app/models/numerics/int4.py). In the modes that are not
token-exact anyway (`inexact`: int8 and int4 on our kernel, bf16) K/V are cached in int8 (int8, int4) or bf16
(bf16; `kv_cache_dtype`) and norms / rotary / SwiGLU run in C (app/models/numerics/elementwise.py).

Only the matrix products change: PyTorch's bf16 norms and attention are slower than fp32 on this CPU (a
stock `model.to(bfloat16)` decode step is slower than fp32), and they are a small part of the work. In
bf16, int8 and int4 the layers that read one input (q/k/v, gate/up) run as one product
(app/models/numerics/fusion.py). Every mode gives each row the same result whatever other rows share the step.

A fast mode runs only where the CPU has the instructions for it (avx512_bf16 or AMX for bf16;
avx512_vnni, avx_vnni or AMX for int8, whose oneDNN kernel saturates without VNNI; avx512_f or avx2 for int4,
our kernel on AVX512-VNNI or AVX2 + FMA); elsewhere the model runs in fp32 and one
log line says why. Nothing outside app/models knows which mode runs, except what /info and /metrics report
(`Numerics.name`); the engine only marks prompt passes (`prompt_pass`), which int4 layers compute in bf16.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from app.models.numerics import elementwise, group_quant
from app.models.numerics.calibration import calibration_ids, input_ranges, smoothing
from app.models.numerics.fusion import as_linear, find_groups, fuse, linear_layers
from app.models.numerics.group_quant import Int8GroupLinear
from app.models.numerics.int4 import Int4Linear, is_four_bit, supports
from app.models.numerics.int4 import prompt_pass as prompt_pass  # the engine marks prompt passes; the layers act on it
from app.models.numerics.int8 import Int8Linear
from app.models.numerics.levels import SourceWeight, Stacked, Weight, dense, materialize
from app.models.numerics.packing import PackedLinear, own_memory, pack_linears

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BF16_FEATURES = ("avx512_bf16", "amx_bf16")
INT8_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
INT4_FEATURES = ("avx512_f", "avx2")  # PyTorch's int4 kernel is vectorized for AVX-512 and AVX2
# What TEXTGEN_DTYPE=auto (with TEXTGEN_QUANTIZE=auto) runs on a CPU, first that the CPU has; each mode's
# WikiText-2 perplexity is within 1% of fp32's (`textgen eval perplexity --modes ...`, test set: int4 on our
# kernel +0.31%, bf16 -0.03%, int8 on our kernel +0.24%). int4 first, for the layers that are 4-bit already
# (see `Numerics.lossless_only`): it is the fastest mode on W1 and on one stream (`textgen bench --compare
# --systems engine --modes fp32,bf16,int8,int4`; docs/benchmarks.md). The rest of the layers: int8 where our
# kernel runs (a float checkpoint's layers too: GPT-2 small reads half bf16's bytes a token and its layers run
# in one C call, 2.7x bf16's one stream; docs/numerics.md), else bf16, else int8 on oneDNN, else fp32.
AUTO_CPU_ORDER = ("int4", "bf16", "int8", "fp32")


@dataclass(frozen=True)
class Numerics:
    """What runs the model's products: `name` is what the log, /info and /metrics show."""

    name: str  # e.g. "int4-w4a8-g32+bf16", "int8-w8a8-g32+bf16", "bf16-packed", "fp32-packed", "cuda-bfloat16"
    mode: str  # "fp32" | "bf16" | "int8" on CPU; the dtype's name otherwise
    load_dtype: torch.dtype  # dtype the model is loaded (and its activations run) in
    fallback: str | None = None  # why a faster mode that was asked for does not run
    # int8 / int4: what runs the layers they leave out ("bf16" or "fp32"); int4 under auto (`lossless_only`:
    # only the layers whose weights are 4-bit already go to int4, so auto adds no rounding to what the file
    # holds) also "int8"
    rest: str = "fp32"
    lossless_only: bool = False
    # int4 / int8: their layers run group_quant.py's kernel (int8 activations per group; AVX512-VNNI or
    # AVX2), not PyTorch's int4 one or oneDNN's int8 one
    own_kernel: bool = False


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
        why = f"{quantize} is a CPU mode; the GPU runs its dtype" if quantize in ("int8", "int4") else None
        return Numerics(f"{device.type}-{str(load).removeprefix('torch.')}", str(load).removeprefix("torch."),
                        load, why)  # fmt: skip
    if not pack_weights:  # the stock transformers model: baselines and references
        load = names.get(dtype, torch.float32)
        return Numerics(str(load).removeprefix("torch."), str(load).removeprefix("torch."), load)
    if dtype == "float16":
        return Numerics("float16", "float16", torch.float16)
    usable = {"int8": _has(features, INT8_FEATURES), "bf16": _has(features, BF16_FEATURES),
              "int4": _has(features, INT4_FEATURES), "fp32": True}  # fmt: skip
    need = {"int8": " or ".join(INT8_FEATURES), "bf16": " or ".join(BF16_FEATURES), "int4": " or ".join(INT4_FEATURES)}
    if quantize in ("int8", "int4") or dtype != "auto":  # asked for one mode: that one, or fp32 and why not
        mode = quantize if quantize in ("int8", "int4") else {"bfloat16": "bf16", "float32": "fp32"}[dtype]
        fallback = None
        if not usable[mode]:
            fallback = f"{mode} needs {need[mode]}, which this CPU does not have; running fp32"
            mode = "fp32"
    else:  # auto: the fastest mode this CPU has (quantize=none: no int8 or int4)
        order = [m for m in AUTO_CPU_ORDER if quantize == "auto" or m not in ("int8", "int4")]
        usable_order = [m for m in order if usable[m]]
        mode = usable_order[0]
        fallback = None
        if mode == "fp32":
            fallback = "this CPU has none of " + ", ".join(need[m] for m in order if m != "fp32") + "; running fp32"
        if mode == "int4":
            own = group_quant.usable(features)
            # the rest on our kernel in 8 bits where it runs (AUTO_CPU_ORDER's note)
            rest = "int8" if own and quantize == "auto" else usable_order[1]
            return Numerics(_name("int4", rest, own), "int4", torch.float32, rest=rest, lossless_only=True,
                            own_kernel=own)  # fmt: skip
    wide_bf16 = mode in ("int8", "int4") and usable["bf16"] and dtype != "float32"
    rest = "bf16" if wide_bf16 else "fp32"
    own = mode in ("int8", "int4") and group_quant.usable(features)
    return Numerics(_name(mode, rest, own), mode, torch.float32, fallback, rest=rest, own_kernel=own)


def _name(mode: str, rest: str, own_kernel: bool = False) -> str:
    """What /info shows for a mode; `rest`: what runs the layers int8 / int4 leave out; `own_kernel`: their
    layers on the group-quantized kernel (int8 activations per row and group of 32)."""
    return {"fp32": "fp32-packed", "bf16": "bf16-packed",
            "int8": f"int8-w8a8-{'g32' if own_kernel else 'per-row'}+{rest}",
            "int4": f"int4-{'w4a8' if own_kernel else 'w4'}-g32+{rest}"}[mode]  # fmt: skip


def on_own_kernel(model: nn.Module) -> bool:
    """Whether `model`'s quantized layers run the group-quantized kernel (int4 or int8 x int8 activations): the
    modes that are not token-exact anyway, where the decode step and the cache may trade exactness for speed too."""
    return any(isinstance(m, Int8GroupLinear) or (isinstance(m, Int4Linear) and m.kernel is not None)
               for m in model.modules())  # fmt: skip


def inexact(model: nn.Module) -> bool:
    """Whether `model` runs a mode that is not token-exact against transformers anyway, where the decode step
    and the cache may trade exactness in the last bits for speed too (norms, rotary and SwiGLU in C, prompts
    through the written-out pass, K/V cached in bf16): int4 and int8 on the group-quantized kernel, and bf16
    (every product in bf16, none in int8 or int4)."""
    if on_own_kernel(model):
        return True
    products = [m for m in model.modules() if isinstance(m, (PackedLinear, Int8Linear, Int4Linear))]
    return bool(products) and all(isinstance(m, PackedLinear) and m.dtype == torch.bfloat16 for m in products)


KV_CACHE_DTYPES = {"bfloat16": torch.bfloat16, "int8": torch.int8}


def kv_cache_dtype(model: nn.Module, setting: str = "auto") -> torch.dtype | None:
    """What the KV cache should store for `model` under TEXTGEN_KV_CACHE_DTYPE (`setting`); None: the model's own
    dtype. A decode step's attention reads every cached token of every row: bf16 is half fp32's bytes, int8 (a
    scale per token and head) a quarter. auto: int8 where the products run our group kernel (int4, int8),
    bf16 in the other inexact mode (bf16), the model's own dtype where results are token-exact (fp32). Models
    with sliding-window layers (Gemma 3) keep bf16 under auto: those layers attend on the torch path, which
    gathers int8 tokens slower (a Gemma 3 decode through `python -m app.bench.kv_perplexity`: 3x as long)."""
    if setting != "auto":
        return KV_CACHE_DTYPES.get(setting)
    sliding = "sliding_attention" in (getattr(getattr(model, "config", None), "layer_types", None) or ())
    if on_own_kernel(model) and not sliding:
        return torch.int8
    return torch.bfloat16 if inexact(model) else None


def file_tiles(source: SourceWeight) -> bool:
    """Whether the kernel takes a file's weight: whole groups of inputs, and whole tiles of outputs in each of its
    parts (a fused group's members are packed one after another)."""
    parts = source.parts if isinstance(source, Stacked) else [source]
    return source.shape[1] % group_quant.GROUP == 0 and all(p.shape[0] % group_quant.TILE == 0 for p in parts)


def keeps_int8(group: list[nn.Module], weight: torch.Tensor, output_layer: nn.Module | None) -> bool:
    """Whether a layer (or fused group) runs in int8 in the int8 mode on oneDNN's kernel (where ours does not
    run; on ours every layer does). Two kinds stay in bf16 (fp32 without avx512_bf16), measured on SmolLM2,
    WikiText-2 valid, 40 x 512 tokens, fp32 20.241:
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


def apply(model: Any, tokenizer: Any, numerics: Numerics) -> Numerics:
    """Put `model` (loaded in fp32 on the CPU) into `numerics`' mode, in place; return the mode that runs
    (under auto, int4 takes only layers it holds exactly: with none, the model runs `numerics.rest`)."""
    if numerics.mode not in ("fp32", "bf16", "int8", "int4") or not torch.backends.mkldnn.is_available():
        return numerics
    if numerics.mode == "fp32":
        pack_linears(model)
        return numerics
    started = time.perf_counter()
    kernel = group_quant.load() if numerics.own_kernel else None
    if kernel is None:  # what runs without our kernel (oneDNN's int8, torch's int4) starts from float weights
        materialize(model)
    layers = [layer for _, _, layer in linear_layers(model)]
    groups = find_groups(model, layers)
    grouped = {id(layer) for g in groups for layer in g}
    singles = [(parent, name, layer) for parent, name, layer in linear_layers(model) if id(layer) not in grouped]
    wide = torch.bfloat16 if numerics.mode == "bf16" or numerics.rest == "bf16" else torch.float32
    output_layer = model.get_output_embeddings()
    # int8 layers: the int8 mode's, and under auto those int4 does not take where the CPU runs int8 next
    with_int8 = numerics.mode == "int8" or (numerics.lossless_only and numerics.rest == "int8")
    # oneDNN's int8 (no kernel of ours) scales activations per row: SmoothQuant's ranges first
    ranges = input_ranges(model, layers, calibration_ids(tokenizer)) if with_int8 and kernel is None else {}
    int8 = 0
    file_int8 = 0  # of them, layers a file holds in 8 bits (or 5, 6), on the kernel as it holds them
    int4: list[Int4Linear] = []

    def make(group: list[nn.Module], source: Weight, bias: torch.Tensor | None) -> nn.Module:
        nonlocal int8, file_int8
        output = any(layer is output_layer for layer in group)
        # a quantized file's weights (numerics/levels.py) go to the kernel as the file holds them: its 4-bit layers
        # as int4 (not the output layer: below), the rest in 8 bits (a 4-bit one widened without change)
        if (kernel is not None and numerics.mode in ("int4", "int8") and not isinstance(source, torch.Tensor)
                and source.bits is not None and file_tiles(source)):  # fmt: skip
            if source.bits == 4 and numerics.mode == "int4" and not output:
                int4.append(Int4Linear(source, bias, kernel=kernel))
                return int4[-1]
            int8 += len(group)
            file_int8 += 0 if output else len(group)
            return Int8GroupLinear(source, bias, kernel)
        weight = dense(source)
        # int4: every layer but the output layer, which stays 8-bit on the kernel (bf16 without it): in int4 it
        # costs +5.4% perplexity (SmolLM2, whose file holds it in 8 bits). Under auto only the layers whose
        # weights are 4-bit already.
        if numerics.mode == "int4" and not output and supports(weight) and (
                not numerics.lossless_only or is_four_bit(weight)):  # fmt: skip
            int4.append(Int4Linear(weight, bias, kernel=kernel))
            return int4[-1]
        if kernel is not None and (with_int8 or output) and group_quant.supports(weight, padded=True):
            # 8 bits per group x int8 activations: every layer of the int8 mode (the down projections and the output
            # layer too: the per-group activation scales take their outlier channels, which one scale per row
            # could not), and int4's output layer (Q8_0 in SmolLM2's file: half bf16's bytes, held exactly)
            int8 += len(group)
            return Int8GroupLinear(weight, bias, kernel)
        if with_int8 and kernel is None and keeps_int8(group, weight, output_layer):
            int8 += len(group)
            # members of a group read the same input, so they saw the same ranges
            return Int8Linear(weight, bias, smooth=smoothing(ranges[id(group[0])], weight))
        return PackedLinear(weight, bias, dtype=wide)

    for parent, name, layer in singles:
        weight, bias = as_linear(layer)  # type: ignore[misc]
        setattr(parent, name, make([layer], weight, bias))
    fuse(model, groups, make)
    if on_own_kernel(model) or numerics.mode == "bf16":  # norms and SwiGLU in C too: these modes are not
        elementwise.install(model)  # token-exact anyway (app/models/numerics/elementwise.py; `inexact`)
    own_memory(model)
    ran = numerics
    if numerics.lossless_only and not int4:
        # what int8 leaves out runs fp32 there: a CPU with avx512_bf16 would have had rest == "bf16"; a file's
        # 8-bit layers run on the kernel as it holds them, beside the rest
        mode, rest = ("int8", numerics.rest) if file_int8 else (numerics.rest, "fp32")
        ran = replace(numerics, name=_name(mode, rest, numerics.own_kernel), mode=mode, lossless_only=False)
    low = f"{int8} 8-bit" + (f", {len(int4)} int4 ({sum(q.lossless for q in int4)} lossless)" if int4 else "")
    log.info("numerics %s: %d linear layers (%s), %d of them fused into %d products, in %.1fs", ran.name,
             len(layers), low, sum(len(g) for g in groups), len(groups), time.perf_counter() - started)  # fmt: skip
    return ran
