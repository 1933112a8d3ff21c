"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Existing OpenAI clients (the `openai` package, LangChain, curl scripts) work unchanged: the same
request fields, response objects, SSE chunk format ending with `data: [DONE]`, and error shape (see
app/api/errors.py). Everything runs on the same engine as /generate.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse

from app.api.deps import EngineDep, ModelInfoDep, SettingsDep
from app.api.errors import openai_error_body, status_for
from app.api.openai_schemas import (
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    OpenAIErrorResponse,
)
from app.api.schemas import Usage
from app.api.streaming import SSE_HEADERS, Collected, collect, sse_events, submit_all
from app.engine.engine import Engine
from app.engine.errors import EngineError, InvalidRequest
from app.engine.stream import RequestStream
from app.engine.types import GenerationRequest, PromptLogprobs, TokenDelta, TokenLogprob

router = APIRouter(prefix="/v1", tags=["openai"])

# The engine's finish reasons in OpenAI's words
FINISH = {"length": "length", "stop": "stop", "eos": "stop"}
# The engine's field names in OpenAI's words, for error messages' `param`
PARAMS = {"max_new_tokens": "max_tokens", "num_return_sequences": "n", "prompt_logprobs": "logprobs"}


def _model_check(requested: str | None, served: str) -> None:
    if requested not in (None, served):
        raise InvalidRequest(f"model '{requested}' is not served here; this server serves '{served}'", field="model")


async def _submit(engine: Engine, request: GenerationRequest) -> RequestStream:
    return (await _submit_all(engine, [request]))[0]


async def _submit_all(engine: Engine, requests: list[GenerationRequest]) -> list[RequestStream]:
    try:
        return await submit_all(engine, requests)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, field=PARAMS.get(exc.field or "", exc.field)) from None


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _usage(results: list[Collected]) -> dict[str, Any]:
    return Usage.of(r.finished for r in results).model_dump()


def _stream_error(error: Exception) -> list[dict[str, Any] | str]:
    """An error after the stream started: OpenAI's error object, then `[DONE]` as always (as vLLM does),
    so clients that wait for the sentinel stop waiting."""
    if isinstance(error, EngineError):
        body = openai_error_body(error.kind, error.message, PARAMS.get(error.field or "", error.field))
        return [body | {"status": status_for(error)}, "[DONE]"]
    return [openai_error_body("internal_error", "internal server error") | {"status": 500}, "[DONE]"]


class TokenText:
    """Token ids -> the text pieces OpenAI's logprobs objects list (cached: the same ids recur)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self.cache[token_id] = text
        return text

    def completion_logprobs(
        self, entries: list[tuple[int, TokenLogprob | None]], offset: int = 0
    ) -> dict[str, Any]:
        """The legacy completions `logprobs` object over (token id, its log-probability) pairs."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, lp in entries:
            piece = self(token_id)
            tokens.append(piece)
            token_logprobs.append(None if lp is None else lp.logprob)
            top.append(None if lp is None else {self(t): v for t, v in lp.top})
            offsets.append(offset)
            offset += len(piece)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def chat_logprobs(self, entries: tuple[TokenLogprob, ...]) -> dict[str, Any]:
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            piece = self(token_id)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

        return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, v) for t, v in e.top]}
                            for e in entries]}  # fmt: skip


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse, "description": text}
    for code, text in {
        400: "Invalid request: `param` names the field",
        429: "Queue full: retry after the Retry-After header's seconds",
        503: "Model not ready or server shutting down",
        504: "The request ran past the server's timeout",
    }.items()
}
STREAM = {"text/event-stream": {"description": "with stream=true: chunks of the same shape, then [DONE]"}}


@router.get("/models", summary="The model this server serves (OpenAI format)", response_model=ModelList)
async def models(info: ModelInfoDep) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": info.name, "object": "model", "created": 0, "owned_by": "textgen"}]}


def _prompt_logprobs(body: CompletionRequest) -> int | None:
    if not body.echo:
        return None
    if body.logprobs is not None:
        return body.logprobs
    return 0 if body.max_tokens == 0 else None  # an echo of the prompt alone is a prompt-scoring request


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


@router.post("/completions", summary="Text completion (OpenAI format)",
             responses={**ERRORS, 200: {"model": CompletionResponse, "content": STREAM}})  # fmt: skip
async def completions(
    body: CompletionRequest, request: Request, engine: EngineDep, info: ModelInfoDep, settings: SettingsDep
) -> Response:
    _model_check(body.model, info.name)
    prompts = _prompts(body.prompt)
    if not prompts:
        raise InvalidRequest("prompt must not be empty", field="prompt")
    if len(prompts) > settings.max_batch_texts:
        raise InvalidRequest(f"at most {settings.max_batch_texts} prompts per call (got {len(prompts)})",
                             field="prompt")  # fmt: skip
    if body.stream and len(prompts) > 1:
        raise InvalidRequest("streaming takes one prompt per request", field="prompt")
    if body.max_tokens == 0 and not body.echo:
        raise InvalidRequest("max_tokens must be >= 1 (0 is allowed only with echo)", field="max_tokens")
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    requests = [
        GenerationRequest(
            prompt=p, max_new_tokens=body.max_tokens, sampling=body.sampling(), stop=body.stops(),
            num_return_sequences=body.n, request_id=f"{rid}-{i}", logprobs=body.logprobs,
            prompt_logprobs=_prompt_logprobs(body), constraint=body.constraint(),
        )
        for i, p in enumerate(prompts)
    ]
    streams = await _submit_all(engine, requests)
    pieces = TokenText(engine.tokenizer)
    echoes = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts] if body.echo else []

    def obj(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": info.name,
                "choices": choices, **extra}  # fmt: skip

    def prompt_entries(prompt: PromptLogprobs | None, ids: list[int]) -> list[tuple[int, TokenLogprob | None]]:
        return list(zip(ids, prompt.tokens, strict=True)) if prompt else []

    if body.stream:
        stream, prompt_ids = streams[0], streams[0].prompt_ids
        offsets: dict[int, int] = {}

        def on_prompt(event: PromptLogprobs | None) -> dict[str, Any] | None:
            if not body.echo:
                return None
            logprobs = pieces.completion_logprobs(prompt_entries(event, prompt_ids)) if event else None
            return obj([{"index": i, "text": echoes[0], "logprobs": logprobs, "finish_reason": None}
                        for i in range(body.n)])  # fmt: skip

        def on_delta(d: TokenDelta) -> dict[str, Any]:
            logprobs = None
            if body.logprobs is not None:
                start = offsets.get(d.index, len(echoes[0]) if echoes else 0)
                logprobs = pieces.completion_logprobs([(e.token_id, e) for e in d.logprobs], start)
                offsets[d.index] = start + len(d.text)
            return obj([{"index": d.index, "text": d.text, "logprobs": logprobs, "finish_reason": None}])

        def on_done(result: Collected) -> list[dict[str, Any] | str]:
            last = [obj([{"index": s.index, "text": "", "logprobs": None, "finish_reason": FINISH[s.finish_reason]}])
                    for s in sorted(result.sequences.values(), key=lambda s: s.index)]  # fmt: skip
            if not result.sequences:  # echo of the prompt only
                last = [obj([{"index": i, "text": "", "logprobs": None, "finish_reason": "length"}])
                        for i in range(body.n)]  # fmt: skip
            return [*last, obj([], usage=_usage([result])), "[DONE]"]

        return EventSourceResponse(sse_events(stream, on_delta, on_done, _stream_error, on_prompt),
                                   headers=SSE_HEADERS)  # fmt: skip

    results = await collect(request.receive, streams)
    if results is None:
        return Response(status_code=499)
    choices = []
    for i, (stream, result) in enumerate(zip(streams, results, strict=True)):
        head = prompt_entries(result.prompt_logprobs, stream.prompt_ids)
        seqs = sorted(result.sequences.values(), key=lambda s: s.index)
        for j in range(body.n):
            seq = seqs[j] if seqs else None
            text = (echoes[i] if body.echo else "") + (seq.text if seq else "")
            logprobs = None
            if body.logprobs is not None:
                tail = list(zip(seq.token_ids, seq.logprobs, strict=True)) if seq else []
                logprobs = pieces.completion_logprobs([*head, *tail])
            finish = FINISH[seq.finish_reason] if seq else "length"
            choices.append({"index": i * body.n + j, "text": text, "logprobs": logprobs, "finish_reason": finish})
    return JSONResponse(obj(choices, usage=_usage(results)))


@router.post("/chat/completions", summary="Chat completion through the model's chat template (OpenAI format)",
             responses={**ERRORS, 200: {"model": ChatResponse, "content": STREAM}})  # fmt: skip
async def chat(body: ChatRequest, request: Request, engine: EngineDep, info: ModelInfoDep) -> Response:
    _model_check(body.model, info.name)
    if not info.has_chat_template:
        raise InvalidRequest(
            f"model '{info.name}' has no chat template, so it cannot take chat messages; use /v1/completions",
            field="messages",
        )
    messages = [m.model_dump() for m in body.messages]
    ids = await engine.on_input(_chat_ids, engine.tokenizer, messages)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    top = (body.top_logprobs or 0) if body.logprobs else None
    stream = await _submit(engine, GenerationRequest(
        prompt=ids, max_new_tokens=body.max_completion_tokens or body.max_tokens, sampling=body.sampling(),
        stop=body.stops(), num_return_sequences=body.n, request_id=rid, logprobs=top, constraint=body.constraint(),
    ))  # fmt: skip
    pieces = TokenText(engine.tokenizer)

    def obj(kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": created, "model": info.name, "choices": choices, **extra}

    if body.stream:
        started: set[int] = set()

        def on_delta(d: TokenDelta) -> dict[str, Any]:
            delta = {"content": d.text}
            if d.index not in started:  # OpenAI's first chunk of each choice carries the role
                started.add(d.index)
                delta = {"role": "assistant", **delta}
            logprobs = pieces.chat_logprobs(d.logprobs) if top is not None else None
            return obj("chat.completion.chunk", [{"index": d.index, "delta": delta, "logprobs": logprobs,
                                                  "finish_reason": None}])  # fmt: skip

        def on_done(result: Collected) -> list[dict[str, Any] | str]:
            seqs = sorted(result.sequences.values(), key=lambda s: s.index)
            ends: list[dict[str, Any]] = [
                {"index": s.index, "delta": {}, "logprobs": None, "finish_reason": FINISH[s.finish_reason]}
                for s in seqs
            ]
            last = [obj("chat.completion.chunk", [end]) for end in ends]
            return [*last, obj("chat.completion.chunk", [], usage=_usage([result])), "[DONE]"]

        return EventSourceResponse(sse_events(stream, on_delta, on_done, _stream_error), headers=SSE_HEADERS)

    results = await collect(request.receive, [stream])
    if results is None:
        return Response(status_code=499)
    seqs = sorted(results[0].sequences.values(), key=lambda s: s.index)
    logprobs: Callable[[Any], dict[str, Any] | None] = (
        (lambda s: pieces.chat_logprobs(s.logprobs)) if top is not None else (lambda s: None)
    )
    choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text}, "logprobs": logprobs(s),
                "finish_reason": FINISH[s.finish_reason]} for s in seqs]  # fmt: skip
    return JSONResponse(obj("chat.completion", choices, usage=_usage(results)))
