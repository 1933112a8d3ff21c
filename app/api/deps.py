"""Dependencies the routes declare: the engine and the loaded model's facts, from app.state.

`async def` on purpose: FastAPI runs a plain `def` dependency in its worker-thread pool, so every request
hopped to one of up to 40 threads just to read an attribute (a soak showed 49 threads under load).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.engine.engine import Engine
from app.engine.errors import EngineStopped
from app.models.loading.loader import ModelInfo


async def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None or not engine.is_running:
        raise EngineStopped("the model is not ready")
    return engine


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_model_info(request: Request) -> ModelInfo:
    info: ModelInfo = request.app.state.model_info
    return info


EngineDep = Annotated[Engine, Depends(get_engine)]
ModelInfoDep = Annotated[ModelInfo, Depends(get_model_info)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
