"""An engine as the server starts it: its limits read from the settings, and the warm-up that proves every device
path before the first client. The server (app/main.py) and the tools (app/bench, app/eval) start engines the same
way through here."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from app.config import Settings
from app.engine.engine import Engine
from app.engine.kv_cache import token_bytes
from app.engine.limits import EngineLimits
from app.engine.types import Constraint, GenerationRequest, RequestFailed, SamplingParams, ScoreRequest

# The KV arena's ceiling where TEXTGEN_MAX_BATCH_TOKENS is not set: its default, 32,768 tokens, is 0.4-0.5 GB for
# SmolLM2 or Qwen2.5-1.5B in int8, but 8.8 GB for a Llama-7B shape (32 full key-value heads): allocated at start.
KV_DEFAULT_BYTES = 2**30
KV_FLOOR_TOKENS = 2048  # however large a model's tokens, at least this many fit


def engine_limits(settings: Settings, model: Any | None = None) -> EngineLimits:
    """Every limit the engine has, read from the setting of the same name: a new limit is a field of
    EngineLimits and of Settings, and /info shows it (its `limits` is EngineLimits itself). With `model`, an unset
    max_batch_tokens is also held to what KV_DEFAULT_BYTES of its KV cache hold."""
    values = {f.name: getattr(settings, f.name) for f in fields(EngineLimits) if f.name != "prefix_cache_bytes"}
    if model is not None and "max_batch_tokens" not in settings.model_fields_set:
        per_token = token_bytes(model, settings.kv_cache_dtype)
        fit = max(KV_FLOOR_TOKENS, KV_DEFAULT_BYTES // per_token) if per_token else values["max_batch_tokens"]
        values["max_batch_tokens"] = min(values["max_batch_tokens"], fit)
    return EngineLimits(**values, prefix_cache_bytes=settings.prefix_cache_mb * 2**20)


WARM_UP_TEXT = "The quick brown fox jumps over the lazy dog, and then it runs back into the deep green forest."


async def warm_up(engine: Engine) -> None:
    """Every kind of device work a request can do, once, so a path that is broken on this device (CUDA, a
    kernel, a dtype) fails at start-up instead of on the first client: a prompt long enough for the prefix
    cache, greedy with log-probabilities (it is stored); the same head again, sampled with every control (a
    prefix-cache hit); a scoring request (a hit too); and a constrained one (the token masks). One at a time
    (the limits may admit one), two tokens each: the prefill's and one decode step's."""
    sampled = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=0)
    requests: list[GenerationRequest | ScoreRequest] = [
        GenerationRequest(prompt=WARM_UP_TEXT, max_new_tokens=2, ignore_eos=True, logprobs=2),
        GenerationRequest(prompt=WARM_UP_TEXT + " Then", max_new_tokens=2, ignore_eos=True, sampling=sampled),
        ScoreRequest(prompt=WARM_UP_TEXT, continuations=(" Yes", " No")),
    ]
    if await engine.on_input(engine.grammars.prepare):  # builds the grammar library's view of the vocabulary
        requests.append(GenerationRequest(prompt=WARM_UP_TEXT, max_new_tokens=2,
                                          constraint=Constraint("choice", ["yes", "no"])))  # fmt: skip
    for request in requests:
        stream = await engine.submit(request)
        async for event in stream:
            if isinstance(event, RequestFailed):
                raise event.error
