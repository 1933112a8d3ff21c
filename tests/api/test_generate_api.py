"""/generate and friends against a real uvicorn server on loopback, with httpx."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from app.models.loading.loader import LoadedModel
from tests.conftest import DEVICE, TINY, LiveServer, live_server, wait_until
from tests.engine.helpers import reference_greedy


def sse_events(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: ") :]))
    return events


def test_generate_greedy_matches_transformers(tiny_server: LiveServer, tiny: LoadedModel) -> None:
    r = httpx.post(f"{tiny_server.url}/generate", json={"prompt": "The capital of France is", "max_new_tokens": 20})
    assert r.status_code == 200
    body = r.json()
    expected = tiny.tokenizer.decode(reference_greedy(tiny, "The capital of France is", 20))
    assert body["generations"][0]["text"] == expected
    assert body["generations"][0]["finish_reason"] == "length"
    assert body["model"] == "tiny-gpt2" and r.headers["x-textgen-model"] == "tiny-gpt2"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}


def test_issue_example_sampling_with_max_length(tiny_server: LiveServer) -> None:
    body = {"prompt": "The quick brown fox", "max_length": 100, "temperature": 0.7, "do_sample": True}
    r = httpx.post(f"{tiny_server.url}/generate", json=body)
    assert r.status_code == 200
    gen = r.json()["generations"][0]
    assert gen["completion_tokens"] == 96 and gen["text"] and gen["seed"] is not None
    # the returned seed reproduces the text
    again = httpx.post(f"{tiny_server.url}/generate", json={**body, "seed": gen["seed"]}).json()
    assert again["generations"][0]["text"] == gen["text"]


def test_return_full_text_and_num_return_sequences(tiny_server: LiveServer) -> None:
    r = httpx.post(f"{tiny_server.url}/generate", json={
        "prompt": "Hello", "max_new_tokens": 5, "return_full_text": True, "num_return_sequences": 3,
        "temperature": 1.0, "seed": 3})  # fmt: skip
    gens = r.json()["generations"]
    assert [g["index"] for g in gens] == [0, 1, 2]
    assert all(g["text"].startswith("Hello") for g in gens)
    assert r.json()["usage"]["completion_tokens"] == 15


def test_streaming_sends_deltas_then_one_final_event(tiny_server: LiveServer, tiny: LoadedModel) -> None:
    with httpx.stream("POST", f"{tiny_server.url}/generate",
                      json={"prompt": "In 1990,", "max_new_tokens": 12, "stream": True}) as r:  # fmt: skip
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    tokens, final = events[:-1], events[-1]
    assert all(e["type"] == "token" for e in tokens) and len(tokens) >= 2
    assert final["type"] == "done"
    assert final["generations"][0]["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 12
    expected = tiny.tokenizer.decode(reference_greedy(tiny, "In 1990,", 12))
    assert "".join(e["text"] for e in tokens) == expected == final["generations"][0]["text"]


def test_stop_string_split_across_tokens_over_http(tiny_server: LiveServer, tiny: LoadedModel) -> None:
    tokens = reference_greedy(tiny, "Once upon a time", 30)
    pieces = [tiny.tokenizer.decode([t]) for t in tokens]
    i = next(i for i in range(len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    full = tiny.tokenizer.decode(tokens)
    expected = full[: full.find(stop)]
    body = {"prompt": "Once upon a time", "max_new_tokens": 30, "stop": [stop], "stream": True}
    with httpx.stream("POST", f"{tiny_server.url}/generate", json=body) as r:
        events = sse_events(r)
    streamed = "".join(e["text"] for e in events if e["type"] == "token")
    assert streamed == expected
    assert events[-1]["generations"][0] == {**events[-1]["generations"][0], "finish_reason": "stop", "text": expected}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "top_k": -1}, "top_k"),
        ({"prompt": "hello there my friend", "max_length": 3}, "max_length"),
        ({"prompt": "hi", "max_new_tokens": 100000}, "max_new_tokens"),
        ({"prompt": "hi", "colour": "blue"}, "colour"),
        ({"prompt": "hi", "max_new_tokens": "ten"}, "max_new_tokens"),
        ({"prompt": ["not", "a", "string"]}, "prompt"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "hi", "num_return_sequences": 2}, "num_return_sequences"),
    ],
)
def test_bad_input_is_422_naming_the_field(tiny_server: LiveServer, body: dict, field: str) -> None:
    r = httpx.post(f"{tiny_server.url}/generate", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field
    assert error["type"] == "invalid_request" and error["message"]


def test_prompt_longer_than_context_says_both_numbers(tiny_server: LiveServer) -> None:
    r = httpx.post(f"{tiny_server.url}/generate", json={"prompt": "word " * 1500})
    assert r.status_code == 422
    msg = r.json()["error"]["message"]
    assert "1501 tokens" in msg and "1024" in msg  # "word " x 1500 is 1501 GPT-2 tokens


def test_malformed_json_and_wrong_content_are_422_not_500(tiny_server: LiveServer) -> None:
    r = httpx.post(f"{tiny_server.url}/generate", content=b"{bad json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]
    # Bytes that are not UTF-8 cannot even be parsed: 400 (FastAPI's choice), never a 500
    r = httpx.post(f"{tiny_server.url}/generate", content=b"\xff\xfe\x00", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request"


def test_health_ready_info_docs(tiny_server: LiveServer) -> None:
    assert httpx.get(f"{tiny_server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{tiny_server.url}/ready").status_code == 200
    info = httpx.get(f"{tiny_server.url}/info").json()
    assert info["model"] == TINY and info["context_length"] == 1024 and info["device"].startswith(DEVICE)
    assert info["limits"]["max_batch_size"] == 32
    assert info["parameters"] == {"tiny-gpt2": 3382080, "random-gpt2-small": 124439808}.get(TINY, info["parameters"])
    assert httpx.get(f"{tiny_server.url}/docs").status_code == 200
    assert "/generate" in httpx.get(f"{tiny_server.url}/openapi.json").json()["paths"]


def test_info_shows_the_engine_s_own_limits_and_state(tiny_server: LiveServer) -> None:
    """/info serves the engine's EngineLimits and EngineStats as they are: every limit (the prefix cache's too)
    and which decode attention runs (the C kernel wherever a compiler built it)."""
    info = httpx.get(f"{tiny_server.url}/info").json()
    assert info["limits"]["max_prompt_tokens"] == 1024 and info["limits"]["prefix_cache_bytes"] == 256 * 2**20
    engine = info["engine"]
    kernel = shutil.which("cc") is not None or shutil.which("gcc") is not None
    assert engine["decode_attention"] == ("ragged-c-kernel" if kernel and DEVICE == "cpu" else "torch")
    assert engine["kv_cache_capacity_bytes"] > 0 and isinstance(engine["batch_sizes"], dict)
    # the device's own memory (CUDA's caching allocator): zero on CPU, the arena at least on CUDA
    metrics = httpx.get(f"{tiny_server.url}/metrics").text
    if DEVICE == "cpu":
        assert engine["device_memory_reserved_bytes"] == engine["device_memory_peak_bytes"] == 0
        assert "textgen_device_memory_reserved_bytes 0.0" in metrics
        assert "textgen_device_memory_peak_allocated_bytes 0.0" in metrics
    else:
        assert engine["device_memory_peak_bytes"] >= engine["kv_cache_capacity_bytes"] > 0
        assert engine["device_memory_reserved_bytes"] >= engine["device_memory_peak_bytes"]
        assert "textgen_device_memory_reserved_bytes 0.0" not in metrics


def test_client_disconnect_mid_stream_frees_its_row(tiny: LoadedModel) -> None:
    with live_server(tiny) as server:
        engine = server.engine
        long = {"prompt": "Hello", "max_new_tokens": 1000, "ignore_eos": True}
        before = engine.stats().generated_tokens
        results: list[httpx.Response] = []
        with httpx.stream("POST", f"{server.url}/generate", json={**long, "stream": True}) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the response, i.e. disconnects
            for line in lines:
                if line.startswith("data:"):
                    break
            assert wait_until(lambda: engine.stats().running_rows >= 1, timeout=5)
            keeper = threading.Thread(target=lambda: results.append(
                httpx.post(f"{server.url}/generate", json=long, timeout=60)))  # fmt: skip
            keeper.start()
        # The stream is closed after one event: its row must go long before its 1000 tokens.
        keeper.join(60)
        assert results[0].status_code == 200 and results[0].json()["usage"]["completion_tokens"] == 1000
        assert wait_until(lambda: engine.stats().running_rows == 0, timeout=5)
        streamed_tokens = engine.stats().generated_tokens - before - 1000
        assert 1 <= streamed_tokens < 1000
        assert engine.scheduler.running_rows == 0 and engine.scheduler.running_tokens == 0
        ok = httpx.post(f"{server.url}/generate", json={"prompt": "Hi", "max_new_tokens": 3})
        assert ok.status_code == 200


def test_client_disconnect_while_waiting_for_json_frees_its_row(tiny: LoadedModel) -> None:
    with live_server(tiny) as server:
        engine = server.engine
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/generate", json={"prompt": "Hello", "max_new_tokens": 1000, "ignore_eos": True},
                       timeout=0.3)  # fmt: skip
        assert wait_until(lambda: engine.stats().running_rows == 0, timeout=3)
        assert engine.stats().generated_tokens < 1000


def test_full_queue_is_429_with_retry_after_and_admitted_requests_finish(tiny: LoadedModel) -> None:
    with live_server(tiny, max_batch_size=1, max_queued_requests=1) as server:
        body = {"prompt": "Hello", "max_new_tokens": 400, "ignore_eos": True}
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(
            httpx.post(f"{server.url}/generate", json=body, timeout=60).status_code)) for _ in range(2)]  # fmt: skip
        threads[0].start()
        assert wait_until(lambda: server.engine.stats().running_rows == 1)
        threads[1].start()
        assert wait_until(lambda: server.engine.stats().waiting == 1)
        r = httpx.post(f"{server.url}/generate", json=body)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "overloaded"
        for t in threads:
            t.join(60)
        assert codes == [200, 200]


def test_timeout_is_504(tiny: LoadedModel) -> None:
    with live_server(tiny, request_timeout=0.3) as server:
        started = time.monotonic()
        r = httpx.post(f"{server.url}/generate", json={"prompt": "Hi", "max_new_tokens": 1000, "ignore_eos": True})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        assert time.monotonic() - started < 5
        # streamed: the error arrives as the last SSE event
        with httpx.stream("POST", f"{server.url}/generate", json={"prompt": "Hi", "max_new_tokens": 1000,
                                                                   "ignore_eos": True, "stream": True}) as s:
            events = sse_events(s)
        assert events[-1]["type"] == "error" and events[-1]["status"] == 504


def test_not_ready_is_503(tiny: LoadedModel) -> None:
    with live_server(tiny) as server:
        server.engine.stop()
        r = httpx.get(f"{server.url}/ready")
        assert r.status_code == 503
        r = httpx.post(f"{server.url}/generate", json={"prompt": "Hi"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        assert httpx.get(f"{server.url}/health").status_code == 200
