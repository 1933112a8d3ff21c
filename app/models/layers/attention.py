"""Decode attention for CPU: one query token per row, keys/values read once per key-value head.

At decode every row brings one query token and attends over its whole cached window, so the step is
bound by reading the K/V cache. PyTorch's CPU flash kernel (what `sdpa` dispatches to) runs these
single-token products at about half the memory bandwidth here; two batched matmuls with the query
heads of one key-value group stacked as rows (B, Hkv, G, D) read each cached key and value once and
run 1.5-2x faster (figures: `python -m app.bench.kernels attention`). Prefill, scoring and every other shape
still go through transformers' `sdpa` path.

Registered with transformers' attention interface under NAME; `use_decode_attention(model)` switches a
loaded model to it. The result matches `sdpa` to float rounding (checked in tests/models/layers/test_attention.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "textgen_cpu_decode"

# Options this kernel does not implement: any of them set sends the call to sdpa.
_UNSUPPORTED = ("position_bias", "softcap", "sliding_window", "s_aux", "sinks")


def decode_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, Hq, q, D)
    key: torch.Tensor,  # (B, Hkv, S, D)
    value: torch.Tensor,  # (B, Hkv, S, Dv)
    attention_mask: torch.Tensor | None,  # (B, 1, q, S): bool (True = attend) or additive float
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if (
        q_len != 1
        or query.device.type != "cpu"
        or dropout
        or q_heads % kv_heads
        or any(kwargs.get(name) is not None for name in _UNSUPPORTED)
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    group = q_heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, group, dim) * scale  # (B, Hkv, G, D): head h uses kv head h // G
    scores = torch.matmul(q, key.transpose(-1, -2))  # (B, Hkv, G, S)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, -length:]  # (B, 1, 1, S)
        # bool: True = attend; float: added to the scores
        bool_mask = mask.dtype == torch.bool
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if bool_mask else scores + mask
    probs = torch.softmax(scores, dim=-1)  # (B, Hkv, G, S)
    out = torch.matmul(probs, value)  # (B, Hkv, G, Dv)
    return out.reshape(batch, 1, q_heads, value.shape[-1]), None  # (B, 1, Hq, Dv), as sdpa returns


AttentionInterface.register(NAME, decode_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # masks built exactly as for sdpa


def use_decode_attention(model: Any) -> bool:
    """Switch a model that runs on CPU with sdpa attention to this kernel; True when it did."""
    param = next(model.parameters())
    if param.device.type != "cpu" or model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
