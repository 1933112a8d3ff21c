"""The app factory: routers, error handlers, and a lifespan that loads the model and runs the engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app import __version__
from app.api import generate, health, openai_compat, tasks, tokens
from app.api.access import AccessMiddleware
from app.api.errors import install_error_handlers
from app.api.guards import ApiKeys, BodyLimit, Draining
from app.config import Settings
from app.engine.engine import Engine
from app.metrics import Metrics
from app.models.loading.loader import LoadedModel, load_model
from app.models.loading.store import StoreError
from app.startup import engine_limits, warm_up

log = logging.getLogger("textgen")


def create_app(settings: Settings | None = None, loaded: LoadedModel | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            model = loaded if loaded is not None else await asyncio.to_thread(load_model, settings)
        except StoreError as exc:
            log.error("textgen cannot start: %s", exc)
            raise SystemExit(f"textgen cannot start: {exc}") from None
        engine = Engine(
            model.model, model.tokenizer, engine_limits(settings, model.model),
            context_length=model.info.context_length, eos_token_ids=model.info.eos_token_ids, observer=metrics,
            threads=model.info.threads,
        )  # fmt: skip
        metrics.bind(engine)
        metrics.describe(model.info)
        engine.start()
        try:
            await warm_up(engine)
            app.state.engine = engine
            app.state.model_info = model.info
            log.info("serving %s (%s) on %s, numerics %s", model.info.name, model.info.source, model.info.device,
                     model.info.numerics)  # fmt: skip
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="textgen",
        version=__version__,
        description="Text generation over a continuous-batching engine.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.draining = False
    # /sentiment's label priors for content-free inputs, per label set (app/api/tasks.py), computed once
    app.state.calibration = {}
    metrics = Metrics()
    install_error_handlers(app)
    app.include_router(generate.router)
    app.include_router(openai_compat.router)
    app.include_router(tasks.router)
    app.include_router(tokens.router)
    app.include_router(health.router)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})  # fmt: skip
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    static = Path(__file__).parent / "static"
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        """The web playground: one static page over the public API."""
        return FileResponse(static / "index.html")

    # Added innermost first: a request meets Access, CORS, BodyLimit, ApiKeys, Draining, then the routes.
    app.add_middleware(Draining, state=app.state)
    app.add_middleware(ApiKeys, keys=settings.all_api_keys(), open_paths=settings.open_paths)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "X-Textgen-Model"])  # fmt: skip
    app.add_middleware(AccessMiddleware, state=app.state, metrics=metrics, routes=app.router.routes)
    return app
