"""The classic GPT-2 tasks over the same engine: thin prompt builders and post-processors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request, Response

from app.api.deps import EngineDep, ModelInfoDep
from app.api.generate import ERRORS, sampling_params
from app.api.schemas import (
    SamplingFields,
    SentimentRequest,
    SentimentResponse,
    SentimentResult,
    SummarizeRequest,
    SummarizeResponse,
    TranslateRequest,
    TranslateResponse,
    Usage,
)
from app.api.streaming import Collected, collect, submit_all
from app.engine.engine import Engine
from app.engine.errors import InvalidRequest
from app.engine.types import GenerationRequest, ScoreRequest
from app.tasks import sentiment, summarize, translate
from app.tasks.family import family_of

router = APIRouter(tags=["tasks"])
EngineRequests = list[GenerationRequest | ScoreRequest]


async def run_all(
    request: Request, engine: Engine, requests: list[GenerationRequest | ScoreRequest]
) -> list[Collected] | None:
    return await collect(request.receive, await submit_all(engine, requests))


def _items(body: SentimentRequest | TranslateRequest | SummarizeRequest, request: Request) -> list[str]:
    try:
        return body.items(request.app.state.settings.max_batch_texts)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="texts" if body.texts is not None else "text") from exc


async def _priors(request: Request, engine: Engine, labels: tuple[str, ...]) -> list[list[float]] | None:
    """Per prompt, the label distribution for content-free inputs (cached per label set)."""
    cache: dict[tuple[str, ...], list[list[float]]] = request.app.state.calibration
    if labels not in cache:
        per_input = await engine.on_input(_sentiment_prompts, engine.tokenizer, sentiment.CONTENT_FREE, labels)
        flat = [p for prompts in per_input for p in prompts]
        done = await run_all(request, engine, [ScoreRequest(p.ids, p.continuations) for p in flat])
        if done is None:
            return None
        dists = [sentiment.softmax(list(c.scores.logprobs)) for c in done if c.scores is not None]
        n = len(per_input[0])
        cache[labels] = [sentiment.mean_distribution(dists[k::n]) for k in range(n)]
    return cache[labels]


@router.post(
    "/sentiment",
    response_model=SentimentResponse,
    responses=ERRORS,
    summary="Classify texts by scoring each label's likelihood",
)
async def classify(body: SentimentRequest, request: Request, engine: EngineDep, info: ModelInfoDep) -> Response:
    texts = _items(body, request)
    labels = tuple(body.labels)
    per_text = await engine.on_input(_sentiment_prompts, engine.tokenizer, texts, labels)
    calibrate = body.calibrate if body.calibrate is not None else sentiment.CALIBRATE[family_of(engine.tokenizer)]
    priors = await _priors(request, engine, labels) if calibrate else None
    flat = [p for prompts in per_text for p in prompts]
    done = await run_all(request, engine, [ScoreRequest(p.ids, p.continuations) for p in flat])
    if done is None or (calibrate and priors is None):
        return Response(status_code=499)
    n = len(per_text[0])
    results = []
    for i in range(len(texts)):
        scored = done[i * n : (i + 1) * n]
        logprobs = [list(c.scores.logprobs) for c in scored if c.scores is not None]
        raws = [sentiment.softmax(lp) for lp in logprobs]
        raw = sentiment.mean_distribution(raws)
        probs = (
            sentiment.mean_distribution([sentiment.calibrate(r, prior) for r, prior in zip(raws, priors, strict=True)])
            if priors is not None
            else raw
        )
        best = max(range(len(labels)), key=lambda k: probs[k])
        results.append(
            SentimentResult(
                label=labels[best],
                score=probs[best],
                scores=dict(zip(labels, probs, strict=True)),
                uncalibrated=dict(zip(labels, raw, strict=True)),
                logprobs={label: [lp[k] for lp in logprobs] for k, label in enumerate(labels)},
            )
        )
    response = SentimentResponse(
        model=info.name,
        results=results,
        calibrated=priors is not None,
        prompts=[p.name for p in per_text[0]],
        usage=_usage(done),
    )
    return Response(response.model_dump_json(), media_type="application/json")


# Prompt templates tokenize: they run on the engine's input thread (Engine.on_input), off the event loop.
def _sentiment_prompts(tokenizer: Any, texts: Sequence[str], labels: tuple[str, ...]) -> list[list[sentiment.Prompt]]:
    family = family_of(tokenizer)
    return [sentiment.build(tokenizer, family, text, labels) for text in texts]


def _translation_prompts(tokenizer: Any, texts: list[str], source: str, target: str) -> list[tuple[list[int], int]]:
    """Per text, its prompt's ids and its own length in tokens."""
    family = family_of(tokenizer)
    return [(translate.prompt_ids(tokenizer, family, text, source, target), len(tokenizer.encode(text)))
            for text in texts]  # fmt: skip


def _summary_prompts(tokenizer: Any, texts: list[str], budget: int) -> list[summarize.Prompt]:
    family = family_of(tokenizer)
    return [summarize.prompt(tokenizer, family, text, budget) for text in texts]


def _usage(done: list[Collected]) -> Usage:
    return Usage.of(c.finished for c in done)


def _generation(ids: list[int], body: SamplingFields, max_new: int, stop: tuple[str, ...]) -> GenerationRequest:
    return GenerationRequest(prompt=ids, max_new_tokens=body.max_new_tokens or max_new,
                             sampling=sampling_params(body), stop=stop)  # fmt: skip


def _language(value: str, field: str) -> str:
    code = translate.resolve(value)
    if code is None:
        raise InvalidRequest(f"unsupported language '{value}'; supported: {translate.supported()}", field=field)
    return code


@router.post("/translate", response_model=TranslateResponse, responses=ERRORS, summary="Translate texts")
async def translate_texts(body: TranslateRequest, request: Request, engine: EngineDep, info: ModelInfoDep) -> Response:
    texts = _items(body, request)
    source = _language(body.source_lang, "source_lang")
    target = _language(body.target_lang, "target_lang")
    if source == target:
        raise InvalidRequest("source_lang and target_lang are the same language", field="target_lang")
    requests: EngineRequests = []
    for ids, length in await engine.on_input(_translation_prompts, engine.tokenizer, texts, source, target):
        # A translation is rarely more than twice as many tokens as its source.
        budget = min(engine.limits.max_new_tokens, 2 * length + 16)
        requests.append(_generation(ids, body, budget, ("\n",)))
    done = await run_all(request, engine, requests)
    if done is None:
        return Response(status_code=499)
    seqs = [c.sequences[0] for c in done]
    response = TranslateResponse(
        model=info.name, source_lang=source, target_lang=target,
        translations=[translate.postprocess(s.text, target) for s in seqs],
        finish_reasons=[s.finish_reason for s in seqs],  # type: ignore[misc]
        usage=_usage(done),
    )  # fmt: skip
    return Response(response.model_dump_json(), media_type="application/json")


@router.post("/summarize", response_model=SummarizeResponse, responses=ERRORS, summary="Summarize articles")
async def summarize_texts(body: SummarizeRequest, request: Request, engine: EngineDep, info: ModelInfoDep) -> Response:
    texts = _items(body, request)
    max_new = body.max_new_tokens or 128
    budget = min(engine.max_prompt_tokens, engine.context_length - max_new)
    prompts = await engine.on_input(_summary_prompts, engine.tokenizer, texts, budget)
    done = await run_all(request, engine, [_generation(p.ids, body, max_new, p.stop) for p in prompts])
    if done is None:
        return Response(status_code=499)
    seqs = [c.sequences[0] for c in done]
    response = SummarizeResponse(
        model=info.name,
        summaries=[summarize.postprocess(s.text) for s in seqs],
        finish_reasons=[s.finish_reason for s in seqs],  # type: ignore[misc]
        truncated=[p.truncated for p in prompts],
        usage=_usage(done),
    )
    return Response(response.model_dump_json(), media_type="application/json")
