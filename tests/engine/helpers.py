"""Drive an Engine directly (no HTTP) and compute transformers' reference answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine.engine import Engine
from app.engine.limits import EngineLimits
from app.engine.types import GenerationRequest, RequestFailed, RequestFinished, SequenceFinished, TokenDelta
from app.models.loader import LoadedModel

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog and then",
    "In 1990,",
    "A",
    "Once upon a time there was a little girl who lived in a village near the forest. She was",
    "def fibonacci(n):\n    ",
    "The capital of France is",
    "Q: What is the boiling point of water?\nA:",
]


def make_engine(model: LoadedModel, **limits: Any) -> Engine:
    engine = Engine(model.model, model.tokenizer, EngineLimits(**limits), context_length=model.info.context_length,
                    eos_token_ids=model.info.eos_token_ids, threads=model.info.threads)  # fmt: skip
    engine.start()
    return engine


@dataclass
class Outcome:
    deltas: list[TokenDelta] = field(default_factory=list)
    sequences: dict[int, SequenceFinished] = field(default_factory=dict)
    finished: RequestFinished | None = None
    error: Exception | None = None

    @property
    def tokens(self) -> list[int]:
        return list(self.sequences[0].token_ids)


async def run_request(engine: Engine, request: GenerationRequest, delay: float = 0.0) -> Outcome:
    await asyncio.sleep(delay)
    out = Outcome()
    async for event in await engine.submit(request):
        if isinstance(event, TokenDelta):
            out.deltas.append(event)
        elif isinstance(event, SequenceFinished):
            out.sequences[event.index] = event
        elif isinstance(event, RequestFinished):
            out.finished = event
        elif isinstance(event, RequestFailed):
            out.error = event.error
    return out


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> bool:
    """Poll a condition that the engine's thread makes true (it has no asyncio event to wait on)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def reference_greedy(model: LoadedModel, prompt: str, max_new_tokens: int) -> list[int]:
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=model.info.eos_token_ids[0])  # fmt: skip
    return out[0, ids.shape[1] :].tolist()  # type: ignore[no-any-return]
