"""Liveness, readiness and what is being served."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app import __version__
from app.api.deps import EngineDep, ModelInfoDep
from app.api.errors import error_body
from app.api.schemas import InfoResponse

router = APIRouter(tags=["health"])


@router.get("/health", summary="The process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="The model is loaded and the engine runs (503 otherwise)")
async def ready(request: Request) -> JSONResponse:
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.is_running:
        return JSONResponse(error_body("unavailable", "the model is not ready"), status_code=503,
                            headers={"Retry-After": "5"})  # fmt: skip
    if request.app.state.draining:
        return JSONResponse(error_body("unavailable", "the server is shutting down"), status_code=503,
                            headers={"Retry-After": "5"})  # fmt: skip
    return JSONResponse({"status": "ready", "model": request.app.state.model_info.name})


@router.get("/info", response_model=InfoResponse, summary="Model, device, limits and engine state")
async def info(engine: EngineDep, model: ModelInfoDep) -> InfoResponse:
    limits = replace(engine.limits, max_prompt_tokens=engine.max_prompt_tokens)  # resolved: the context length
    return InfoResponse(
        version=__version__,
        model=model.name,
        source=model.source,
        architecture=model.architecture,
        parameters=model.parameters,
        device=model.device,
        dtype=model.dtype,
        numerics=model.numerics,
        context_length=model.context_length,
        vocab_size=model.vocab_size,
        has_chat_template=model.has_chat_template,
        limits=limits,
        engine=engine.stats(),
    )
