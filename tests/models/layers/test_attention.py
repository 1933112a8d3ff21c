"""The CPU decode attention kernel: same numbers as sdpa for one query token, sdpa itself otherwise,
end to end, the stock model's greedy tokens: tests/models/numerics/test_packing.py and tests/engine (the loaded
models use both fast paths)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from app.models.layers.attention import NAME, decode_attention
from app.models.loading.loader import LoadedModel


def _module(groups: int) -> nn.Module:
    module = nn.Module()
    module.num_key_value_groups = groups  # type: ignore[assignment]
    module.is_causal = True  # type: ignore[assignment]
    return module


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(9, 3), (4, 4)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_single_token_matches_sdpa(q_heads: int, kv_heads: int, mask_kind: str) -> None:
    torch.manual_seed(0)
    rows, window, dim = 5, 37, 16
    buffer_k = torch.randn(rows, kv_heads, window + 11, dim)  # (B, Hkv, capacity, D): the cache hands out slices
    buffer_v = torch.randn(rows, kv_heads, window + 11, dim)
    key, value = buffer_k[:, :, 3 : 3 + window], buffer_v[:, :, 3 : 3 + window]
    query = torch.randn(rows, q_heads, 1, dim)
    # right-aligned rows of different lengths, as the slot cache holds them
    lengths = torch.tensor([37, 1, 20, 5, 36])
    allowed = torch.arange(window)[None, :] >= (window - lengths)[:, None]  # (B, S)
    mask: torch.Tensor | None = None
    if mask_kind == "bool":
        mask = allowed[:, None, None, :]
    elif mask_kind == "float":
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    module = _module(q_heads // kv_heads)
    with torch.inference_mode():
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
        got, _ = decode_attention(module, query, key, value, mask, scaling=0.3)
    assert got.shape == expected.shape == (rows, 1, q_heads, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if mask_kind != "none":
        # padding columns are really ignored: changing them changes nothing
        buffer_k[1, :, 3 : 3 + window - 1] = 1e3
        with torch.inference_mode():
            again, _ = decode_attention(module, query, key, value, mask, scaling=0.3)
        torch.testing.assert_close(again[1], got[1], rtol=1e-5, atol=1e-5)


def test_prefill_shapes_go_to_sdpa_unchanged() -> None:
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    module = _module(1)
    with torch.inference_mode():
        expected, _ = sdpa_attention_forward(module, query, key, value, None)
        got, _ = decode_attention(module, query, key, value, None)
    assert torch.equal(got, expected)


def test_loader_switches_cpu_models_to_the_kernel(tiny: LoadedModel) -> None:
    assert tiny.model.config._attn_implementation == NAME
