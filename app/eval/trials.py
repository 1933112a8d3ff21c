"""Every candidate prompt of a task tried on every dev row once, through an in-process engine (no HTTP),
greedy, as the endpoints run them; the outputs are kept in a JSON file, so choosing again (other folds,
another metric) needs no model. app/eval/choose.py cross-validates over them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.config import Settings
from app.engine.engine import Engine
from app.engine.types import GenerationRequest, RequestFailed, SequenceFinished
from app.models.loading.loader import LoadedModel
from app.startup import engine_limits
from app.tasks import summarize, translate
from app.tasks.family import family_of

SUMMARY_TOKENS = 128  # /summarize's default max_new_tokens


def engine_for(model: LoadedModel, settings: Settings, prefix_cache_mb: int | None = None) -> Engine:
    """The server's engine, with room to queue a whole dev file (and, given `prefix_cache_mb`, to keep every
    article's K/V: templates that put the article first then share its prefill)."""
    update: dict[str, object] = {"max_queued_requests": 100_000, "max_queued_tokens": 2**31,
                                 "request_timeout": 7 * 24 * 3600.0}  # a dev file, however slow the machine
    if prefix_cache_mb is not None:
        update["prefix_cache_mb"] = prefix_cache_mb
    limits = engine_limits(settings.model_copy(update=update))
    return Engine(model.model, model.tokenizer, limits, context_length=model.info.context_length,
                  eos_token_ids=model.info.eos_token_ids, threads=model.info.threads)  # fmt: skip


async def _generate_all(engine: Engine, requests: list[GenerationRequest], at_once: int) -> list[str]:
    gate = asyncio.Semaphore(at_once)

    async def one(request: GenerationRequest) -> str:
        async with gate:
            text: str | None = None
            async for event in await engine.submit(request):
                if isinstance(event, SequenceFinished):
                    text = event.text
                elif isinstance(event, RequestFailed):
                    raise event.error
            assert text is not None
            return text

    return list(await asyncio.gather(*(one(r) for r in requests)))


class Cache:
    """Outputs per candidate, in a JSON file when given one: {"model", "numerics", "inputs", "outputs": {name:
    ...}}. Kept outputs are used only for the same model and the same inputs (a digest of the rows)."""

    def __init__(self, path: Path | None, model: str, numerics: str, inputs: object) -> None:
        self.path, self.model, self.numerics = path, model, numerics
        self.inputs = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        self.outputs: dict[str, Any] = {}
        if path and path.is_file():
            kept = json.loads(path.read_text())
            if (kept.get("model"), kept.get("inputs")) == (model, self.inputs):
                self.outputs, self.numerics = kept["outputs"], kept["numerics"]

    def get(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self.outputs:
            self.outputs[name] = make()
            if self.path:
                self.path.write_text(json.dumps({"model": self.model, "numerics": self.numerics,
                                                 "inputs": self.inputs, "outputs": self.outputs}))  # fmt: skip
        return self.outputs[name]


def translations(engine: Engine, sources: list[str], targets: tuple[str, ...], cache: Cache,
                 at_once: int = 64) -> dict[str, dict[str, list[str]]]:  # fmt: skip
    """Per candidate template, per target language: the post-processed translation of each source."""
    tokenizer = engine.tokenizer
    family = family_of(tokenizer)
    out: dict[str, dict[str, list[str]]] = {}
    for name in translate.TEMPLATES[family]:
        def run(name: str = name) -> dict[str, list[str]]:
            per_target = {}
            for target in targets:
                requests = []
                for text in sources:  # as /translate: a budget from the source's length, the answer's first line
                    ids = translate.prompt_ids(tokenizer, family, text, "en", target, name)
                    budget = min(engine.limits.max_new_tokens, 2 * len(tokenizer.encode(text)) + 16)
                    requests.append(GenerationRequest(prompt=ids, max_new_tokens=budget, stop=("\n",)))
                texts = asyncio.run(_generate_all(engine, requests, at_once))
                per_target[target] = [translate.postprocess(t, target) for t in texts]
            return per_target

        out[name] = cache.get(name, run)
    return out


def summaries(engine: Engine, articles: list[str], cache: Cache, at_once: int = 16) -> dict[str, list[str]]:
    """Per candidate template: the post-processed summary of each article, as /summarize makes it."""
    tokenizer = engine.tokenizer
    family = family_of(tokenizer)
    budget = min(engine.max_prompt_tokens, engine.context_length - SUMMARY_TOKENS)
    out: dict[str, list[str]] = {}
    for name in summarize.TEMPLATES[family]:
        def run(name: str = name) -> list[str]:
            prompts = [summarize.prompt(tokenizer, family, a, budget, name) for a in articles]
            requests = [GenerationRequest(prompt=p.ids, max_new_tokens=SUMMARY_TOKENS, stop=p.stop) for p in prompts]
            return [summarize.postprocess(t) for t in asyncio.run(_generate_all(engine, requests, at_once))]

        out[name] = cache.get(name, run)
    return out
