"""End to end with the real offline default model: a few golden checks over real HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.models.loading.loader import LoadedModel
from tests.conftest import live_server
from tests.engine.helpers import reference_greedy

pytestmark = pytest.mark.smollm


def test_smollm_served_over_http_matches_transformers(smollm: LoadedModel) -> None:
    with live_server(smollm) as server:
        info = httpx.get(f"{server.url}/info").json()
        assert info["model"] == "smollm2-135m-instruct" and info["architecture"] == "LlamaForCausalLM"
        assert info["parameters"] == 134_515_008 and info["context_length"] == 8192

        prompts = ["The capital of France is", "Water boils at", "def add(a, b):", "My favourite colour is"]

        async def greedy_all() -> list[dict]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                rs = await asyncio.gather(*[
                    client.post("/generate", json={"prompt": p, "max_new_tokens": 8 + 4 * i})
                    for i, p in enumerate(prompts)
                ])  # fmt: skip
            return [r.json() for r in rs]

        bodies = asyncio.run(greedy_all())
        for i, (prompt, body) in enumerate(zip(prompts, bodies, strict=True)):
            expected = reference_greedy(smollm, prompt, 8 + 4 * i)
            gen = body["generations"][0]
            assert gen["text"] == smollm.tokenizer.decode(expected, skip_special_tokens=True)
            assert gen["completion_tokens"] == len(expected)

        # The example: sampling with max_length counts the prompt.
        r = httpx.post(f"{server.url}/generate", timeout=120, json={
            "prompt": "The quick brown fox", "max_length": 100, "temperature": 0.7, "do_sample": True})  # fmt: skip
        assert r.status_code == 200 and r.json()["generations"][0]["text"].strip()
        assert r.json()["usage"]["total_tokens"] <= 100


def test_smollm_task_endpoints_use_chat_prompts_and_answer_sensibly(smollm: LoadedModel) -> None:
    from app.tasks import summarize, translate
    from tests.api.test_sentiment_api import direct
    from tests.api.test_tasks_api import greedy_text

    texts = ["I loved this film: warm, funny and beautifully acted.", "A boring, clumsy waste of two hours."]
    article = ("The city council approved a new footbridge over the river on Monday. The bridge will link the "
               "old town with the railway station and is expected to open in two years. It will cost 12 million "
               "euros, most of it paid by the regional government.")  # fmt: skip
    with live_server(smollm) as server:
        r = httpx.post(f"{server.url}/sentiment", json={"texts": texts}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["prompts"] == ["instruction", "few-shot-a", "few-shot-list-a", "few-shot-b"]
        assert body["calibrated"] is False  # what cross-validation chose for chat models
        assert [res["label"] for res in body["results"]] == ["positive", "negative"]
        for text, res in zip(texts, body["results"], strict=True):
            assert sum(res["scores"].values()) == pytest.approx(1.0, abs=1e-9)
            for k, (logprobs, _) in enumerate(direct(smollm, text, ("negative", "positive"))):
                assert [res["logprobs"][label][k] for label in ("negative", "positive")] == pytest.approx(
                    logprobs, abs=1e-4
                )

        r = httpx.post(f"{server.url}/translate", json={"text": "Good morning, my friend.", "target_lang": "fr"},
                       timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        got = r.json()["translations"][0]
        ids = translate.prompt_ids(smollm.tokenizer, "chat", "Good morning, my friend.", "en", "fr")
        budget = 2 * len(smollm.tokenizer.encode("Good morning, my friend.")) + 16
        assert got == translate.postprocess(greedy_text(smollm, ids, budget, "\n"), "fr")
        assert "bonjour" in got.lower()

        r = httpx.post(f"{server.url}/summarize", json={"text": article, "max_new_tokens": 40}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["truncated"] == [False] and body["summaries"][0]
        p = summarize.prompt(smollm.tokenizer, "chat", article, 8192 - 40)
        assert body["summaries"][0] == summarize.postprocess(greedy_text(smollm, p.ids, 40, p.stop[0]))
        assert "bridge" in body["summaries"][0].lower()


@pytest.mark.own_process  # a third SmolLM2 server (its KV arena ~1.5 GB): the shared process was OOM-killed with it
def test_smollm_chat_with_response_format_returns_valid_json(smollm: LoadedModel) -> None:
    """The official client, a real chat model, OpenAI's json_schema response format: every answer parses and
    validates; the same messages without it get free text."""
    import json

    import jsonschema
    import openai

    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3}},
        "required": ["name", "age", "hobbies"], "additionalProperties": False}  # fmt: skip
    people = ["a retired sailor from Lisbon", "a young chess player", "a baker who loves music", "a nurse"]
    with live_server(smollm) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        for person in people:
            out = client.chat.completions.create(
                model="smollm2-135m-instruct", temperature=0, max_tokens=150,
                messages=[{"role": "user", "content": f"Describe {person} as JSON with name, age and hobbies."}],
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
            )  # fmt: skip
            assert out.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(out.choices[0].message.content or ""), schema)
        anything = client.chat.completions.create(
            model="smollm2-135m-instruct", temperature=0, max_tokens=150, response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "Give me a JSON object describing a cat."}])  # fmt: skip
        # any object, unbounded: a 135M model may repeat keys until max_tokens, so only its start is certain
        text = anything.choices[0].message.content or ""
        assert text.startswith("{") and (anything.choices[0].finish_reason == "length" or json.loads(text))
