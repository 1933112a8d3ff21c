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
from app.models.loading.loader import LoadedModel

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


def reference_greedy(model: LoadedModel, prompt: str, max_new_tokens: int, **generate: Any) -> list[int]:
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids.to(model.model.device)
    with torch.inference_mode():
        out = model.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=model.info.eos_token_ids[0],
                                   **generate)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()  # type: ignore[no-any-return]


# How far apart (in logits) the reference's token and ours may be where the two first differ. On CPU in fp32
# greedy tokens must be equal (a row's logits do not depend on the batch, and the arithmetic is fp32 with
# rounding-level differences in attention only). In bf16 those differences change roundings of the next
# layer's inputs, and on CUDA cuBLAS picks its kernels by the number of rows, so the last bits of a row's
# logits change with the batch: a token may flip where the reference's top two were that close.
NEAR_TIE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}
DIVERGENCES: list[dict[str, Any]] = []  # the near ties met on this run (scripts/device-check.sh reports them)


def assert_greedy(model: LoadedModel, prompt: str, got: list[int], expected: list[int], what: str = "") -> None:
    """`got` is transformers' greedy answer `expected`, exactly on CPU; on CUDA, up to a first difference at a
    near tie (then the two continue from different text, and nothing after it is compared)."""
    if got == expected:
        return
    device = next(model.model.parameters()).device
    numerics = model.info.numerics  # fp32-packed, bf16-packed, cuda-bfloat16, ...
    dtype = "bfloat16" if "bf" in numerics else "float16" if "float16" in numerics else "float32"
    assert (device.type, dtype) != ("cpu", "float32"), f"{what}: {got} != {expected}"
    at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
    assert at < min(len(got), len(expected)), f"{what}: lengths differ: {len(got)} != {len(expected)}"
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    context = torch.cat([ids, torch.tensor([expected[:at]], dtype=ids.dtype, device=device)], dim=1)
    with torch.inference_mode():
        logits = model.model(input_ids=context).logits[0, -1].float()  # (V,)
    gap = float(logits[expected[at]] - logits[got[at]])
    DIVERGENCES.append({"what": what, "at": at, "of": len(expected), "gap": gap, "dtype": dtype})
    assert gap <= NEAR_TIE[dtype], f"{what}: token {at} differs and the reference led by {gap:.4f} logits"
