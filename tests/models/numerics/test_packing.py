"""Prepacked oneDNN linears: same numbers as F.linear, batch-invariant, same greedy tokens as the stock model."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from app.models.loading.loader import LoadedModel
from app.models.loading.store import OFFLINE_DEFAULT, TINY_GPT2
from app.models.numerics.packing import PackedLinear, can_pack, pack_linears
from tests.conftest import STORE
from tests.engine.helpers import PROMPTS

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def _stock(name: str) -> LoadedModel:
    from app.config import Settings
    from app.models.loading.loader import load_model

    return load_model(Settings(model=name, model_store=STORE, threads=2, pack_weights=False))


def test_packed_linear_matches_linear_and_is_batch_invariant() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 200)
    packed = PackedLinear(layer.weight, layer.bias)
    x = torch.randn(32, 3, 96)  # (B, L, K)
    with torch.inference_mode():
        expected = layer(x)
        got = packed(x)
        alone = packed(x[5:6])
    assert got.shape == (32, 3, 200)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a row's result does not depend on which other rows share the call
    assert torch.equal(alone[0], got[5])


@pytest.mark.parametrize("k,n", [(3072, 768), (1536, 576), (768, 2304)])
def test_a_lone_row_gets_what_it_gets_among_others(k: int, n: int) -> None:
    """oneDNN ran one row of a K > N layer through a split-K kernel: GPT-2 small's MLP output (3072 -> 768) and
    SmolLM2's (1536 -> 576) gave a lone row other sums than the same row in a batch of two or more."""
    torch.manual_seed(0)
    packed = PackedLinear(torch.randn(n, k) * 0.02, torch.randn(n))
    x = torch.randn(40, k)
    with torch.inference_mode():
        together = packed(x)
        assert all(torch.equal(packed(x[:m]), together[:m]) for m in (1, 2, 3, 17))
        assert torch.equal(packed(x[3]), together[3])  # one row without a batch dimension too


def test_conv1d_is_packed_with_its_transposed_weight() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv1D(48, 16), torch.nn.Linear(48, 8))
    x = torch.randn(4, 16)
    with torch.inference_mode():
        expected = model(x)
        assert pack_linears(model) == 2
        got = model(x)
    assert isinstance(model[0], PackedLinear) and isinstance(model[1], PackedLinear)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _greedy(model: LoadedModel, prompt: str, n: int) -> list[int]:
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                   pad_token_id=model.info.eos_token_ids[0])  # fmt: skip
    return [int(t) for t in out[0, ids.shape[1] :]]


def test_tiny_packed_greedy_equals_stock_model(tiny: LoadedModel) -> None:
    assert any(isinstance(m, PackedLinear) for m in tiny.model.modules()), "the loader packs on CPU by default"
    stock = _stock(TINY_GPT2)
    assert can_pack(stock.model)
    assert not any(isinstance(m, PackedLinear) for m in stock.model.modules())
    for prompt in PROMPTS:
        assert _greedy(tiny, prompt, 24) == _greedy(stock, prompt, 24), prompt


@pytest.mark.smollm
def test_smollm_packed_greedy_equals_stock_model(smollm: LoadedModel) -> None:
    stock = _stock(OFFLINE_DEFAULT)
    for prompt in PROMPTS[:4]:
        assert _greedy(smollm, prompt, 32) == _greedy(stock, prompt, 32), prompt
