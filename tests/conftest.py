"""Shared fixtures: models from the real store, and real uvicorn servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from app.config import Settings
from app.engine.memory import release_free_memory
from app.main import create_app
from app.models.loading.loader import LoadedModel, load_model
from app.models.loading.store import OFFLINE_DEFAULT, TINY_GPT2, ModelStore

# Tests use the project's model store (pulled once; CI pulls on its first run) unless told otherwise.
STORE = Path(os.environ.get("TEXTGEN_TEST_STORE", Path(__file__).resolve().parent.parent / "model_store"))


# The device check (scripts/device-check.sh) runs the same tests on another device, dtype and model: the `tiny`
# fixture loads TEXTGEN_TEST_TINY (default tiny-gpt2) on TEXTGEN_TEST_DEVICE in TEXTGEN_TEST_DTYPE.
DEVICE = os.environ.get("TEXTGEN_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("TEXTGEN_TEST_DTYPE", "float32")
TINY = os.environ.get("TEXTGEN_TEST_TINY", TINY_GPT2)


def _loaded(name: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    store = ModelStore(STORE)
    if not store.has(name):
        store.pull(name)
    # fp32: the reference path, token-exact against transformers (the faster modes: tests/models/numerics/)
    settings = Settings(model=name, model_store=STORE, threads=2, dtype=dtype, device=device)  # type: ignore[arg-type]
    return load_model(settings)


@pytest.fixture(scope="module", autouse=True)
def _memory_back_after_each_module() -> Iterator[None]:
    """Models a module loaded for itself (numeric modes, converted GGUFs, gemma) are garbage once it is done:
    collect them and hand the heap back, or the session's RSS (13-17 GB with the shared fixtures) climbs
    past the machine's 24 GB."""
    yield
    gc.collect()
    release_free_memory()


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return _loaded(TINY, DEVICE, DTYPE)


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    return _loaded(OFFLINE_DEFAULT)


def random_qwen2(vocab_size: int, **config: Any) -> Any:
    """A tiny random Qwen2ForCausalLM: Llama's block with biases on q/k/v (random here: they start at zero) and
    tied embeddings."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                         tie_word_embeddings=True, **config)).eval()  # fmt: skip
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """`random_qwen2` with GPT-2's BPE tokenizer, saved as a local Hugging Face folder and loaded as one, in fp32."""
    from transformers import AutoTokenizer

    _loaded(TINY_GPT2)  # pulled: its tokenizer files are what this model reads
    located = ModelStore(STORE).locate(TINY_GPT2)
    assert located is not None
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = AutoTokenizer.from_pretrained(located.path)
    tokenizer.save_pretrained(folder)
    model = random_qwen2(len(tokenizer), max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model.save_pretrained(folder)
    return load_model(Settings(model=str(folder), model_store=STORE, threads=2, dtype="float32"))


class LiveServer:
    """A real uvicorn server on 127.0.0.1 (random free port), running the app in its own thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def engine(self) -> Any:
        return self.app.state.engine


@contextlib.contextmanager
def live_server(model: LoadedModel, **settings: Any) -> Iterator[LiveServer]:
    settings.setdefault("model_store", STORE)
    app = create_app(Settings(model=model.info.name, **settings), loaded=model)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_server(tiny: LoadedModel) -> Iterator[LiveServer]:
    with live_server(tiny) as server:
        yield server


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """TEXTGEN_TEST_PROCESS=shared | own: `make test` runs the tests marked own_process (they load models of
    their own: numeric modes, converted GGUFs, gemma) in a second pytest process, so that neither process
    holds every model at once (one process peaked at 24.2 GB RSS on this 24 GB machine). Unset: all of them."""
    if os.environ.get("TEXTGEN_TEST_SLOW") != "1":  # real-size models: run with TEXTGEN_TEST_SLOW=1
        slow = [item for item in items if item.get_closest_marker("slow") is not None]
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]
    which = os.environ.get("TEXTGEN_TEST_PROCESS")
    if which not in ("shared", "own"):
        return
    keep = [item for item in items if (item.get_closest_marker("own_process") is not None) == (which == "own")]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With TEXTGEN_TEST_REPORT set (the device check): the near ties the greedy comparisons met, as JSON."""
    report = os.environ.get("TEXTGEN_TEST_REPORT")
    if report:
        import json

        from tests.engine.helpers import DIVERGENCES

        Path(report).write_text(json.dumps({"device": DEVICE, "dtype": DTYPE, "model": TINY,
                                            "near_ties": DIVERGENCES}, indent=1))  # fmt: skip
