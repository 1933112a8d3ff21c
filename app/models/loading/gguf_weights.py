"""A GGUF file's tensors straight into a model, without a float copy of it.

The model is built with its parameters on the meta device; every linear layer becomes a `SourceLinear` whose
weight is a tensor of the file (`GgufTensor`), read with plain file reads (no memory map, so pages the loader has
done with leave the process) when the numeric mode builds that layer, one layer or fused group at a time. The
embedding table stays in its file's levels (`LevelsEmbedding`); norms, biases and other small tensors are read as
float. The quantized types whose blocks are group-32 forms (Q4_0, Q4_1, Q4_K's and Q5_K's 32-weight sub-blocks
with their 6-bit scales and mins, Q5_0, Q5_1, Q8_0) give the kernel the file's own levels; the others (Q6_K, Q3_K
and Q2_K with 16-weight sub-blocks, the IQ types) are dequantized by gguf's own code and rounded to 8 bits per
group of 32 (255 levels over each group's range; their cost: docs/numerics.md).

Names come from transformers' GGUF map (the same as its own GGUF loader), and so do the fix-ups llama.cpp's
converter applied: Llama's q/k rows are un-permuted (on the blocks: a row's blocks move with it), Gemma's norms
lose their +1. Architectures whose tensors need more than that (the MoE ones) take the conversion path
(app/models/loading/gguf.py).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.models.kernels import compiled
from app.models.numerics.group_quant import quantize8, quantize8_zero
from app.models.numerics.levels import Levels, LevelsEmbedding, SourceLinear

# GGUF architectures built here: those whose tensors need at most a row permutation (llama), a transpose back
# to a layer's own layout (gpt2's Conv1D, which we never build) or a change of a float tensor (gemma's norms)
DIRECT = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt2", "phi3", "starcoder2", "stablelm")
CHUNK = 1 << 22  # weights decoded at a time: a layer of a 7B model is not turned into floats at once


class GgufTensor:
    """One weight of the file, (N, K) in PyTorch's order, read when asked (`levels`, `dense`)."""

    def __init__(self, fd: int, name: str, qtype: Any, shape: tuple[int, int], offset: int, nbytes: int,
                 rows: np.ndarray | None = None) -> None:  # fmt: skip
        self.fd, self.name, self.qtype = fd, name, qtype
        self.shape = shape
        self.offset, self.nbytes = offset, nbytes
        self.rows = rows  # a permutation of the rows (Llama's q / k), or None

    def _raw(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the file's bytes, (R, bytes per row) uint8."""
        per_row = self.nbytes // self.shape[0]
        if self.rows is None:
            data = os.pread(self.fd, (stop - start) * per_row, self.offset + start * per_row)
            return np.frombuffer(data, dtype=np.uint8).reshape(stop - start, per_row)
        whole = np.frombuffer(os.pread(self.fd, self.nbytes, self.offset), dtype=np.uint8)
        picked: np.ndarray = whole.reshape(self.shape[0], per_row)[self.rows[start:stop]]
        return picked

    def _chunks(self) -> list[tuple[int, int]]:
        n, k = self.shape
        step = max(16, CHUNK // k // 16 * 16)  # whole tiles of the kernel's 16 outputs
        return [(i, min(n, i + step)) for i in range(0, n, step)]

    def dense(self) -> torch.Tensor:
        """(N, K) fp32, by gguf's own dequantization (what transformers' GGUF loader computes)."""
        from gguf import dequantize

        parts = [dequantize(self._raw(a, b), self.qtype).reshape(b - a, -1) for a, b in self._chunks()]
        return torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=False))

    @property
    def bits(self) -> int | None:
        from gguf import GGMLQuantizationType as T

        if self.qtype in (T.F32, T.F16, T.BF16):
            return None
        return {T.Q4_0: 4, T.Q4_1: 4, T.Q4_K: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q5_K: 5}.get(self.qtype, 8)

    @property
    def symmetric(self) -> bool:
        """No per-group minimum: Q4_0, Q5_0, Q8_0, and Q6_K / Q3_K / the IQ types (their 8-bit form is symmetric too,
        a byte a weight without a zero plane)."""
        from gguf import GGMLQuantizationType as T

        return self.qtype not in (T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K, T.Q2_K, T.F32, T.F16, T.BF16)

    @property
    def q4k(self) -> bool:
        from gguf import GGMLQuantizationType as T

        return bool(self.qtype == T.Q4_K)

    def chunks(self) -> Iterator[Levels]:
        assert self.bits is not None, f"{self.name} is a float tensor"
        for a, b in self._chunks():
            yield self._levels(a, b)

    def _levels(self, start: int, stop: int) -> Levels:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

        rows, k = stop - start, self.shape[1]
        raw = self._raw(start, stop)
        _, size = GGML_QUANT_SIZES[self.qtype]
        decoded = _decode(self.qtype, raw.reshape(-1, size))
        if decoded is None and self.qtype == GGMLQuantizationType.Q6_K and _blocks_kernel() is not None:
            u, d = _q6_k_to_q8(raw.reshape(-1, size))  # the same as below, in one C pass
            return Levels(u.reshape(rows, k), 128, d.reshape(rows, k // 32), None, 8, exact=False)
        if decoded is None:  # no group-32 form: gguf's dequantization, then 8 bits per group of 32
            w = _q6_k(raw.reshape(-1, size)) if self.qtype == GGMLQuantizationType.Q6_K else torch.from_numpy(
                dequantize(raw, self.qtype).astype(np.float32, copy=False))  # fmt: skip
            w = w.reshape(rows, k)
            if self.symmetric:  # 255 levels over [-max |w|, max |w|], as Q8_0
                signed, d, _ = quantize8(w, measure=False)
                return Levels((signed.to(torch.int16) + 128).to(torch.uint8), 128, d, None, 8, exact=False)
            u, d, z, _ = quantize8_zero(w)  # 255 levels over [min w, max w]
            return Levels(u, 128, d, z, 8, exact=False)
        q, off, scale, zero, bits, own = decoded
        groups = k // 32
        held = None if own is None else tuple(torch.from_numpy(a.reshape(rows, -1)) for a in own)
        return Levels(torch.from_numpy(q.reshape(rows, k)), off, torch.from_numpy(scale.reshape(rows, groups)),
                      None if zero is None else torch.from_numpy(zero.reshape(rows, groups)), bits,
                      k=held)  # type: ignore[arg-type]  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch's order (ggml's dims reversed)
    qtype: int
    offset: int  # from the file's start
    nbytes: int

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))


# sizes of GGUF's scalar value types (uint8 ... float64), by type number; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def index(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The file's scalar metadata (arrays, such as the vocabulary, skipped) and its tensors' places: what
    gguf's GGUFReader finds, without turning each of a 151k-token vocabulary's strings into objects (~13 s)."""
    from gguf import GGML_QUANT_SIZES

    with path.open("rb") as fh:
        head = fh.read(24)
        magic, version, tensors, kvs = struct.unpack("<IIQQ", head)
        if magic != 0x46554747 or version not in (2, 3):
            raise ValueError(f"not a little-endian GGUF v2/v3 file (magic {magic:#x}, version {version})")
        fh.seek(0)
        buf = memoryview(fh.read(max(1 << 20, min(path.stat().st_size, 1 << 26))))
        at = 24

        def need(n: int) -> None:
            nonlocal buf
            if at + n > len(buf):  # metadata larger than what was read: read it all
                fh.seek(0)
                buf = memoryview(fh.read(max(2 * len(buf), at + n)))

        def string() -> str:
            nonlocal at
            need(8)
            (n,) = struct.unpack_from("<Q", buf, at)
            need(8 + n)
            text = bytes(buf[at + 8 : at + 8 + n]).decode("utf-8", errors="replace")
            at += 8 + n
            return text

        def scalar(kind: int) -> Any:
            nonlocal at
            fmt = "<" + _SCALARS[kind]
            need(struct.calcsize(fmt))
            (value,) = struct.unpack_from(fmt, buf, at)
            at += struct.calcsize(fmt)
            return value

        fields: dict[str, Any] = {}
        for _ in range(kvs):
            key = string()
            kind = scalar(4)
            if kind == 8:
                fields[key] = string()
            elif kind == 9:  # an array: skipped
                item, count = scalar(4), scalar(10)
                for _ in range(count):
                    if item == 8:
                        need(8)
                        at += 8 + struct.unpack_from("<Q", buf, at)[0]
                    elif item == 9:
                        raise ValueError(f"{key}: nested arrays are not read here")
                    else:
                        at += struct.calcsize("<" + _SCALARS[item]) * count
                        break
            else:
                fields[key] = scalar(kind)
        raw = []
        for _ in range(tensors):
            name = string()
            dims = [scalar(10) for _ in range(scalar(4))]
            raw.append((name, tuple(reversed(dims)), scalar(4), scalar(10)))
        alignment = int(fields.get("general.alignment", 32))
        start = (at + alignment - 1) // alignment * alignment
    infos = []
    for name, shape, qtype, offset in raw:
        block, size = GGML_QUANT_SIZES[qtype]
        elements = int(np.prod(shape))
        infos.append(TensorInfo(name, shape, qtype, start + offset, elements // block * size))
    return fields, infos


@cache
def _blocks_kernel() -> Any:
    """kernels/gguf_blocks.c's q6_k_to_q8, or None without a compiler (then the torch path runs)."""

    def bind(path: Path) -> Any:
        fn = ctypes.CDLL(str(path)).q6_k_to_q8
        fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        fn.restype = None
        return fn

    return compiled.load("gguf_blocks.c", "Q6_K block converter", bind)


def _q6_k_to_q8(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 210) Q6_K blocks -> u (B, 256) uint8 and d (B, 8) fp32: `_q6_k` then `quantize8` (+ 128), bit for bit,
    in one C pass."""
    n = blocks.shape[0]
    data = np.ascontiguousarray(blocks)
    u = torch.empty(n, 256, dtype=torch.uint8)
    d = torch.empty(n, 8)
    _blocks_kernel()(data.ctypes.data, n, u.data_ptr(), d.data_ptr(), torch.get_num_threads())
    return u, d


def _q6_k(blocks: np.ndarray) -> torch.Tensor:
    """(B, 210) Q6_K blocks -> (B, 256) fp32: gguf's Q6_K.dequantize_blocks step for step (the same products, so
    the same numbers), in torch over the whole chunk at once (gguf's loop over 16-row groups took ~2 s for
    Qwen2.5-1.5B's output layer)."""
    b = torch.from_numpy(blocks.copy())  # the file's bytes are read-only
    n = b.shape[0]
    ql, qh = b[:, :128].reshape(n, 2, 1, 64), b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()  # (B, 16)
    d = b[:, 208:210].contiguous().view(torch.float16).float()  # (B, 1)
    low = torch.cat([ql & 15, ql >> 4], dim=2).reshape(n, 2, 4, 32)  # (B, 2, 4, 32): gguf's (B, 8, 32) order
    high = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)  # (B, 2, 4, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return ((d * scales).reshape(n, 16, 1) * q).reshape(n, 256)


def _half(b: np.ndarray) -> np.ndarray:
    """(B, 2) uint8 -> (B, 1) fp32 of the fp16 they hold."""
    return b.copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(B, ..., W) bytes -> (B, ..., 2 W): the low nibbles, then the high ones (ggml's order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


# (u (B, block) uint8, off, d (B, groups) fp32, z or None, bits, Q4_K's own scales or None)
Decoded = tuple[np.ndarray, int, np.ndarray, np.ndarray | None, int, tuple[np.ndarray, ...] | None]


def _decode(qtype: Any, blocks: np.ndarray) -> Decoded | None:
    """(u (B, block) uint8, off, d (B, groups) fp32, z or None, bits, own) of `blocks` (B, type size), where w =
    (u - off) d + z per group of 32 holds the type exactly (GGUF's dequantization computes the same products);
    `own`: Q4_K's D, Dmin (B, 1) fp16 and sc, m (B, 8) uint8 (Levels.k). None for a type without such a form."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import Q4_K

    b = blocks.shape[0]
    if qtype == T.Q8_0:  # d, 32 int8
        q = blocks[:, 2:].copy().view(np.int8)
        return (q.astype(np.int16) + 128).astype(np.uint8), 128, _half(blocks[:, :2]), None, 8, None
    if qtype == T.Q4_0:  # d, 16 bytes of nibbles: w = d (q - 8)
        return _nibbles(blocks[:, 2:]), 8, _half(blocks[:, :2]), None, 4, None
    if qtype == T.Q4_1:  # d, m, nibbles: w = d q + m
        return _nibbles(blocks[:, 4:]), 0, _half(blocks[:, :2]), _half(blocks[:, 2:4]), 4, None
    if qtype in (T.Q5_0, T.Q5_1):  # d, [m,] 32 high bits, nibbles
        at = 2 if qtype == T.Q5_0 else 4
        qh = blocks[:, at : at + 4].copy().view(np.uint32)  # (B, 1)
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (B, 32)
        q = _nibbles(blocks[:, at + 4 :]) | (high << 4)
        if qtype == T.Q5_0:  # w = d (q - 16)
            return q, 16, _half(blocks[:, :2]), None, 5, None
        return q, 0, _half(blocks[:, :2]), _half(blocks[:, 2:4]), 5, None  # w = d q + m
    if qtype in (T.Q4_K, T.Q5_K):  # d, dmin, 12 bytes of 6-bit scales and mins, [32 high bits,] nibbles (256)
        d, dmin = _half(blocks[:, :2]), _half(blocks[:, 2:4])  # (B, 1)
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())  # (B, 8) each
        scale = d * sc.astype(np.float32)  # (B, 8): exact in fp32 (11 bits times 6)
        zero = -(dmin * m.astype(np.float32))  # w = scale q - dmin m
        if qtype == T.Q4_K:
            q = _nibbles(blocks[:, 16:].reshape(b, 4, 32)).reshape(b, 256)
            own = (blocks[:, :2].copy().view(np.float16), blocks[:, 2:4].copy().view(np.float16),
                   sc.astype(np.uint8), m.astype(np.uint8))  # fmt: skip
            return q, 0, scale, zero, 4, own
        qh = blocks[:, 16:48].reshape(b, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # (B, 8, 32)
        low = _nibbles(blocks[:, 48:].reshape(b, 4, 32)).reshape(b, 8, 32)
        return (low | ((qh & 1) << 4)).reshape(b, 256), 0, scale, zero, 5, None
    return None


def _names(model: nn.Module, architecture: str, config: Any) -> dict[str, str] | None:
    """GGUF tensor name -> the model's parameter name, from gguf's map of the model's own names; None where that
    misses a parameter (then transformers' map, which also tries every submodule's names: ~2 s on 24 layers)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == architecture), None)
    if arch is None:
        return None
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    found = {}
    for hf in model.state_dict():
        base, _, suffix = hf.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is not None:
            found[f"{gguf_name}.{suffix}"] = hf
    mapped = set(found.values())
    return found if all(name in mapped for name, _ in model.named_parameters()) else None


def build(path: Path, fd: int, config: Any) -> nn.Module:
    """`config`'s causal LM with the tensors of the GGUF file at `path` (module docstring), read through `fd` (open
    on it, until the numeric mode has replaced every SourceLinear)."""
    from accelerate import init_empty_weights
    from gguf import GGMLQuantizationType, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        LlamaTensorProcessor,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    fields, infos = index(path)
    architecture = str(fields["general.architecture"])
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    to_hf = _names(model, architecture, config) or get_gguf_hf_weights_map(model, processor)
    tensors: dict[str, GgufTensor] = {}
    dense: dict[str, TensorInfo] = {}  # hf name -> the others (norms, biases)
    for t in infos:
        hf = to_hf.get(t.name)
        if hf is None:
            continue
        shape = t.shape
        if len(shape) == 2:
            rows = None
            if isinstance(processor, LlamaTensorProcessor) and (".attn_q." in t.name or ".attn_k." in t.name):
                heads = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
                order = np.arange(shape[0]).reshape(shape[0], 1)
                rows = processor._reverse_permute_weights(order, heads, heads).reshape(-1)
            tensors[hf] = GgufTensor(fd, t.name, GGMLQuantizationType(t.qtype), (shape[0], shape[1]), t.offset,
                                     t.nbytes, rows)  # fmt: skip
        else:
            dense[hf] = t

    def read_dense(hf: str) -> torch.Tensor:
        if hf not in dense:
            return tensors[hf].dense()
        t = dense[hf]
        data = np.frombuffer(os.pread(fd, t.nbytes, t.offset), dtype=np.uint8)
        weights = dequantize(data, GGMLQuantizationType(t.qtype)).reshape(t.shape)
        processed = processor.process(weights=weights, name=t.name, tensor_key_mapping=to_hf,
                                      parsed_parameters={"tensors": {}})  # fmt: skip
        return torch.from_numpy(np.array(processed.weights, dtype=np.float32))

    modules = dict(model.named_modules())
    output = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in modules.items() if m is embed)
    for name, module in list(modules.items()):
        if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        key = f"{name}.weight"
        if key not in tensors and module is output:  # tied: the output layer is the embedding table
            key = f"{embed_name}.weight"
        if key not in tensors:
            raise ValueError(f"{path.name} has no 2-D tensor for {key}")
        bias = getattr(module, "bias", None)
        parent_name, _, attr = name.rpartition(".")
        layer = SourceLinear(tensors[key], None if bias is None else read_dense(f"{name}.bias"))
        setattr(modules[parent_name] if parent_name else model, attr, layer)
    table_source = tensors[f"{embed_name}.weight"]
    if table_source.bits is not None:
        parent_name, _, attr = embed_name.rpartition(".")
        scale = getattr(embed, "embed_scale", None)
        table = LevelsEmbedding(table_source, None if scale is None else torch.as_tensor(scale, dtype=torch.float32))
        setattr(modules[parent_name] if parent_name else model, attr, table)
    for pname, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        if pname not in dense and pname not in tensors:
            raise ValueError(f"{path.name} has no tensor for {pname}")
        owner_name, _, attr = pname.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, attr, nn.Parameter(read_dense(pname).reshape(param.shape), requires_grad=False))
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"{path.name}: no tensor for {', '.join(leftover[:3])}")
    model.eval()
    built: nn.Module = model
    return built
