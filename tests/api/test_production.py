"""API keys, body limit, CORS, request ids and access logs, and Prometheus metrics, over real HTTP."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.models.loading.loader import LoadedModel
from tests.conftest import LiveServer, live_server, wait_until


def test_api_keys(tiny: LoadedModel, tmp_path: Path) -> None:
    body = {"prompt": "Hello", "max_new_tokens": 2}
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated monthly\nkey-two\n")
    with live_server(tiny, api_keys=["key-one"], api_keys_file=keys_file) as server:
        url = server.url
        missing = httpx.post(f"{url}/generate", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "unauthorized" and "API key" in missing.json()["error"]["message"]
        wrong = httpx.post(f"{url}/generate", json=body, headers={"Authorization": "Bearer key-three"})
        assert wrong.status_code == 401
        assert httpx.post(f"{url}/generate", json=body, headers={"Authorization": "Bearer key-two"}).status_code == 200
        assert httpx.post(f"{url}/generate", json=body, headers={"X-API-Key": "key-one"}).status_code == 200
        # validation never runs for a caller without a key
        assert httpx.post(f"{url}/generate", json={"prompt": ""}).status_code == 401
        for open_path in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{url}{open_path}").status_code == 200
        # OpenAI clients: their error shape, and their key header works
        with pytest.raises(openai.AuthenticationError) as exc:
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        assert exc.value.status_code == 401 and exc.value.body["type"] == "authentication_error"  # type: ignore[index]
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="key-one", max_retries=0)
        assert good.completions.create(model="tiny-gpt2", prompt="Hi", max_tokens=2).choices[0].text


def test_body_limit(tiny: LoadedModel) -> None:
    with live_server(tiny, max_body_bytes=2048) as server:
        big = {"prompt": "word " * 1000, "max_new_tokens": 2}
        r = httpx.post(f"{server.url}/generate", json=big)
        assert r.status_code == 413 and "2048 bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: chunked transfer
            for _ in range(10):
                yield b" " * 500
            yield json.dumps({"prompt": "Hi", "max_new_tokens": 2}).encode()

        assert httpx.post(f"{server.url}/generate", content=chunks(),
                          headers={"content-type": "application/json"}).status_code == 413  # fmt: skip
        payload = json.dumps({"prompt": "Hi", "max_new_tokens": 2}).encode()
        small = httpx.post(f"{server.url}/generate", content=payload, headers={"content-type": "application/json"})
        assert small.status_code == 200
        v1 = httpx.post(f"{server.url}/v1/completions", json={"prompt": "word " * 1000})
        assert v1.status_code == 413 and v1.json()["error"]["code"] == "payload_too_large"


def test_cors_off_by_default_and_configurable(tiny: LoadedModel, tiny_server: LiveServer) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}  # fmt: skip
    r = httpx.post(f"{tiny_server.url}/generate", json={"prompt": "Hi", "max_new_tokens": 1},
                   headers={"Origin": "https://app.example"})  # fmt: skip
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with live_server(tiny, cors_origins=["https://app.example"], api_keys=["k"]) as server:
        pre = httpx.options(f"{server.url}/generate", headers=preflight)
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.post(f"{server.url}/generate", json={"prompt": "Hi", "max_new_tokens": 1},
                       headers={"Origin": "https://app.example", "X-API-Key": "k"})  # fmt: skip
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "X-Request-ID" in r.headers["access-control-expose-headers"]
        other = httpx.options(f"{server.url}/generate", headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_request_id_and_one_log_line_per_request(tiny_server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="textgen.access"):
        mine = httpx.post(f"{tiny_server.url}/generate", json={"prompt": "Hello", "max_new_tokens": 3},
                          headers={"X-Request-ID": "client-42"})  # fmt: skip
        theirs = httpx.post(f"{tiny_server.url}/generate", json={"prompt": "Hello", "max_new_tokens": 3},
                            headers={"X-Request-ID": "bad id with spaces"})  # fmt: skip
        bad = httpx.post(f"{tiny_server.url}/generate", json={"prompt": "Hello", "temperature": -1})
        # the access line is written once the response has gone out: the client can read it first
        assert wait_until(lambda: sum(r.name == "textgen.access" for r in caplog.records) >= 3)
    assert mine.headers["x-request-id"] == "client-42"
    generated = theirs.headers["x-request-id"]
    assert generated != "bad id with spaces" and len(generated) == 32
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "textgen.access"]
    by_id = {line["request_id"]: line for line in lines}
    assert by_id["client-42"]["status"] == 200 and by_id["client-42"]["route"] == "/generate"
    assert (by_id["client-42"]["prompt_tokens"], by_id["client-42"]["completion_tokens"]) == (1, 3)
    assert by_id["client-42"]["total_s"] > 0 and "queue_s" in by_id["client-42"]
    assert by_id[bad.headers["x-request-id"]]["status"] == 422
    assert len([line for line in lines if line["request_id"] == "client-42"]) == 1


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_metrics_change_as_requests_are_served(tiny_server: LiveServer) -> None:
    url = tiny_server.url
    before = scrape(url)
    for _ in range(3):
        httpx.post(f"{url}/generate", json={"prompt": "Hello there", "max_new_tokens": 5, "ignore_eos": True})
    httpx.post(f"{url}/generate", json={"prompt": ""})
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("textgen_http_requests_total", route="/generate", method="POST", status="200") == 3
    assert delta("textgen_http_requests_total", route="/generate", method="POST", status="422") == 1
    assert delta("textgen_http_request_duration_seconds_count", route="/generate") == 4
    assert delta("textgen_generated_tokens_total") == 15
    assert delta("textgen_prompt_tokens_total") == 6
    assert delta("textgen_time_to_first_token_seconds_count") == 3
    assert delta("textgen_inter_token_seconds_count") == 12
    assert delta("textgen_batch_size_count") >= 12 and delta("textgen_engine_step_seconds_count") >= 12
    assert delta("textgen_queue_seconds_count") == 3
    assert ("textgen_queue_length", ()) in after and ("textgen_running_sequences", ()) in after


def test_max_batch_texts(tiny: LoadedModel) -> None:
    with live_server(tiny, max_batch_texts=2) as server:
        r = httpx.post(f"{server.url}/sentiment", json={"texts": ["a", "b", "c"]})
        assert r.status_code == 422 and "at most 2" in r.json()["error"]["message"]
        v1 = httpx.post(f"{server.url}/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1})
        assert v1.status_code == 400 and v1.json()["error"]["param"] == "prompt"


def test_kv_arena_is_the_configured_budget_from_the_start(tiny: LoadedModel) -> None:
    config = tiny.model.config
    with live_server(tiny, max_batch_tokens=4096, max_batch_size=8) as server:
        # one K and one V per layer, per token: (tokens + one decode column per row) x layers x 2 x hidden x the
        # cache's element (fp32 on CPU in every mode; the model's dtype on CUDA)
        element = 4 if tiny.info.device == "cpu" else next(tiny.model.parameters()).element_size()
        expected = (4096 + 8) * config.n_layer * 2 * config.n_embd * element
        first = httpx.get(f"{server.url}/info").json()["engine"]
        assert (first["kv_cache_capacity_bytes"], first["kv_cache_bytes"]) == (expected, 0)
        for n in (5, 40, 300):
            r = httpx.post(f"{server.url}/generate", json={"prompt": "word " * n, "max_new_tokens": 8})
            assert r.status_code == 200
        after = httpx.get(f"{server.url}/info").json()["engine"]
        assert (after["kv_cache_capacity_bytes"], after["kv_cache_bytes"]) == (expected, 0)  # never regrown
        assert scrape(server.url)[("textgen_kv_cache_capacity_bytes", ())] == expected
