"""Faults over real HTTP: clients that leave at every stage, a dying engine loop, KV memory returned."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
import uvicorn

from app.config import Settings
from app.main import create_app
from app.models.loading.loader import LoadedModel
from app.server import DrainingServer
from tests.conftest import STORE, live_server, wait_until

LONG = {"prompt": "Hello", "max_new_tokens": 600, "ignore_eos": True}


def idle(engine: Any) -> bool:
    s = engine.stats()
    return (s.running_requests, s.running_rows, s.waiting, s.kv_cache_bytes) == (0, 0, 0, 0) and (
        engine.scheduler.running_rows,
        engine.scheduler.running_tokens,
    ) == (0, 0)


def test_disconnect_while_queued_frees_the_request(tiny: LoadedModel) -> None:
    with live_server(tiny, max_batch_size=1) as server:
        engine = server.engine
        warm_up = engine.stats().generated_tokens
        done: list[httpx.Response] = []
        first = threading.Thread(target=lambda: done.append(httpx.post(f"{server.url}/generate", json=LONG,
                                                                        timeout=60)))  # fmt: skip
        first.start()
        assert wait_until(lambda: engine.stats().running_rows == 1)
        with pytest.raises(httpx.ReadTimeout):  # waits behind `first`, then its client gives up
            httpx.post(f"{server.url}/generate", json=LONG, timeout=0.3)
        assert wait_until(lambda: engine.stats().waiting == 0, timeout=3)
        assert first.is_alive(), "the queued request should have been dropped while the first still ran"
        first.join(60)
        assert done[0].status_code == 200 and done[0].json()["usage"]["completion_tokens"] == 600
        assert wait_until(lambda: idle(engine), timeout=5)
        # the dropped request never ran: only the first one's tokens were generated (after the warm-up's)
        assert engine.stats().generated_tokens == warm_up + 600


def test_disconnect_during_prefill_frees_the_row(tiny: LoadedModel) -> None:
    with live_server(tiny) as server:
        engine = server.engine
        real = engine.model_runner.prefill

        def slow_prefill(*args: Any, **kwargs: Any) -> Any:  # a prefill long enough to hang up during
            time.sleep(0.6)
            return real(*args, **kwargs)

        engine.model_runner.prefill = slow_prefill
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/generate", json=LONG, timeout=0.2)
        assert wait_until(lambda: idle(engine), timeout=5)
        assert engine.stats().generated_tokens < 600
        engine.model_runner.prefill = real
        assert httpx.post(f"{server.url}/generate", json={"prompt": "Hi", "max_new_tokens": 3}).status_code == 200
        assert wait_until(lambda: idle(engine), timeout=5)


def test_disconnect_mid_decode_returns_the_kv_memory(tiny: LoadedModel) -> None:
    with live_server(tiny) as server:
        engine = server.engine
        with httpx.stream("POST", f"{server.url}/generate", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the response, i.e. disconnects
            for line in lines:
                if line.startswith("data:"):
                    break
            # the first token is sent just before its row joins the batch
            assert wait_until(lambda: engine.stats().kv_cache_bytes > 0, timeout=5)
        assert wait_until(lambda: idle(engine), timeout=5)  # rows, reservations and KV buffers all gone


def test_a_failed_step_fails_only_its_rows_over_http(tiny: LoadedModel) -> None:
    with live_server(tiny) as server:
        engine = server.engine
        real = engine.model_runner.decode
        calls = {"n": 0}

        def flaky() -> Any:
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("injected fault")
            return real()

        engine.model_runner.decode = flaky
        r = httpx.post(f"{server.url}/generate", json={"prompt": "Hello", "max_new_tokens": 20})
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
        assert "RuntimeError" in r.json()["error"]["message"]
        assert wait_until(lambda: idle(engine), timeout=5)
        ok = httpx.post(f"{server.url}/generate", json={"prompt": "Hello", "max_new_tokens": 20})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 20
        assert httpx.get(f"{server.url}/ready").status_code == 200


def test_a_dead_engine_loop_makes_ready_503_and_the_server_exit_nonzero(tiny: LoadedModel) -> None:
    app = create_app(Settings(model=tiny.info.name, model_store=STORE), loaded=tiny)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"), app, grace=5)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, timeout=60)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    engine = app.state.engine
    assert httpx.get(f"{url}/ready").status_code == 200

    def broken_step() -> None:
        raise MemoryError("injected: the loop itself fails")

    engine.step = broken_step
    r = httpx.post(f"{url}/generate", json={"prompt": "Hello", "max_new_tokens": 5})
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"  # a typed answer, not a hang
    assert engine.fatal is not None and not engine.is_running
    thread.join(30)
    assert not thread.is_alive() and server.exit_code == 1


def test_ready_is_503_once_the_engine_loop_died(tiny: LoadedModel) -> None:
    with live_server(tiny) as server:  # a plain uvicorn server: it stays up, but says it is not ready
        engine = server.engine

        def broken_step() -> None:
            raise SystemError("injected")

        engine.step = broken_step
        httpx.post(f"{server.url}/generate", json={"prompt": "Hello", "max_new_tokens": 5})
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.post(f"{server.url}/generate", json={"prompt": "Hi"}).status_code == 503


def test_warm_up_runs_every_device_path_and_a_broken_one_stops_the_start(tiny: LoadedModel, monkeypatch: Any) -> None:
    with live_server(tiny) as server:  # warm-up alone: a stored prompt, a hit by a sampled one and by scoring
        engine = server.engine
        assert len(engine.prefix_cache) >= 1 and engine.prefix_cache.hit_tokens >= 2 * 16
    from app.engine.prefix_cache import Hit

    def broken(self: Hit) -> Any:  # as the CUDA pool with CPU index tensors failed: only on a prefix hit
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(Hit, "gather", broken)
    with pytest.raises(RuntimeError, match="uvicorn did not start"), live_server(tiny):
        pass
