"""Models whose layers mix full and sliding-window attention (Gemma 3): the engine's decode must give the
sliding layers their own mask, or its tokens part from `generate` once a row is longer than the window."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.engine.types import GenerationRequest
from app.models.loading.loader import LoadedModel, load_model
from tests.engine.helpers import PROMPTS, make_engine, reference_greedy, run_request

WINDOW = 6


@pytest.fixture(scope="module")
def tiny_gemma(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A small random Gemma 3 (three sliding layers of WINDOW tokens, one full) with GPT-2's tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("tiny-gemma3")
    config = Gemma3TextConfig(
        vocab_size=len(tiny.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=512, bos_token_id=tiny.tokenizer.bos_token_id, eos_token_id=tiny.tokenizer.eos_token_id,
        pad_token_id=tiny.tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # larger weights than the init's: tokens that depend on what the window holds
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny.info.path) / name, folder / name)
    return load_model(Settings(model=str(folder), model_store=folder.parent / "store", threads=2, dtype="float32"))


async def _greedy(model: LoadedModel, n: int, sliding: bool = True) -> list[list[int]]:
    engine = make_engine(model)
    if not sliding:
        engine.model_runner.sliding_window = None
    try:
        outs = await asyncio.gather(*(run_request(engine, GenerationRequest(prompt=p, max_new_tokens=n,
                                                                          ignore_eos=True), delay=0.003 * i)
                                      for i, p in enumerate(PROMPTS[:6])))  # fmt: skip
    finally:
        engine.stop()
    return [o.tokens for o in outs]


async def test_sliding_window_layers_decode_as_generate_does(tiny_gemma: LoadedModel) -> None:
    assert tiny_gemma.info.architecture == "Gemma3ForCausalLM"
    n = 24  # every row ends far past the window
    expected = [reference_greedy(tiny_gemma, p, n) for p in PROMPTS[:6]]
    assert await _greedy(tiny_gemma, n) == expected
    # one mask for every layer (what the engine passed before): the rows part from generate
    assert await _greedy(tiny_gemma, n, sliding=False) != expected
