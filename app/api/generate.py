"""POST /generate: text continuation, whole or streamed as Server-Sent Events."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.sse import EventSourceResponse

from app.api.deps import EngineDep, ModelInfoDep
from app.api.errors import error_body, status_for
from app.api.schemas import ErrorResponse, GenerateRequest, GenerateResponse, Generation, SamplingFields, Usage
from app.api.streaming import SSE_HEADERS, Collected, collect, sse_events
from app.engine.errors import EngineError
from app.engine.types import GenerationRequest, SamplingParams, TokenDelta

router = APIRouter(tags=["generate"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        422: "Invalid request: the message names the field",
        429: "Queue full: retry after the Retry-After header's seconds",
        503: "Model not ready or server shutting down",
        504: "The request ran past the server's timeout",
    }.items()
}


def sampling_params(body: SamplingFields) -> SamplingParams:
    # Like TGI: asking for a temperature / top-k / top-p means asking for sampling.
    wants_sampling = any(v is not None for v in (body.temperature, body.top_k, body.top_p))
    return SamplingParams(
        do_sample=body.do_sample if body.do_sample is not None else wants_sampling,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed,
    )


def engine_request(body: GenerateRequest, request_id: str) -> GenerationRequest:
    return GenerationRequest(
        prompt=body.prompt,
        max_new_tokens=body.max_new_tokens,
        max_length=body.max_length,
        sampling=sampling_params(body),
        stop=tuple(body.stop or ()),
        num_return_sequences=body.num_return_sequences,
        ignore_eos=body.ignore_eos,
        request_id=request_id,
        constraint=body.constraint.engine() if body.constraint else None,
    )


def build_response(body: GenerateRequest, request_id: str, model: str, result: Collected) -> GenerateResponse:
    assert result.finished is not None
    prefix = body.prompt if body.return_full_text else ""
    generations = [
        Generation(
            index=seq.index,
            text=prefix + seq.text,
            finish_reason=seq.finish_reason,  # type: ignore[arg-type]
            completion_tokens=len(seq.token_ids),
            seed=seq.seed,
            constraint_complete=seq.constraint_complete,
        )
        for seq in sorted(result.sequences.values(), key=lambda s: s.index)
    ]
    f = result.finished
    return GenerateResponse(
        id=request_id,
        model=model,
        generations=generations,
        usage=Usage.of([f]),
        queue_seconds=round(f.queue_seconds, 4),
        total_seconds=round(f.total_seconds, 4),
    )  # fmt: skip


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}},
    summary="Continue a prompt",
)
async def generate(body: GenerateRequest, request: Request, engine: EngineDep, info: ModelInfoDep) -> Response:
    request_id = f"gen-{uuid.uuid4().hex[:24]}"
    stream = await engine.submit(engine_request(body, request_id))
    if body.stream:

        def on_delta(delta: TokenDelta) -> dict[str, Any]:
            return {"type": "token", "index": delta.index, "text": delta.text, "token_id": delta.token_id}

        def on_done(result: Collected) -> list[dict[str, Any] | str]:
            final = build_response(body, request_id, info.name, result)
            return [{"type": "done", **final.model_dump()}]

        def on_error(error: Exception) -> dict[str, Any]:
            if isinstance(error, EngineError):
                body = error_body(error.kind, error.message, error.field)
                return {"type": "error", "status": status_for(error), **body}
            return {"type": "error", "status": 500, **error_body("internal_error", "internal server error")}

        return EventSourceResponse(sse_events(stream, on_delta, on_done, on_error), headers=SSE_HEADERS)

    results = await collect(request.receive, [stream])
    if results is None:  # the client left; nobody reads this
        return Response(status_code=499)
    return Response(
        build_response(body, request_id, info.name, results[0]).model_dump_json(), media_type="application/json"
    )
