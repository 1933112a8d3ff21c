"""Constrained output against a real uvicorn: JSON Schema, regex and choice, per row inside one batch.

tiny-gpt2 has random weights: whatever it writes inside a constraint is what the grammar alone allows, so
a valid output here is the mask's doing, not the model's.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import LiveServer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "status": {"enum": ["active", "inactive"]},
    },
    "required": ["name", "age", "tags", "address", "status"],
    "additionalProperties": False,
}  # fmt: skip
DATE = "[0-9]{4}-[0-9]{2}-[0-9]{2}"
WORDS = ("cat", "dog", "river", "city", "bridge", "storm", "song", "market", "garden", "letter", "engine", "island",
         "tower", "forest", "coin", "lamp", "ship", "road", "clock", "map")  # fmt: skip
PROMPTS = [f"Record {i}: the {w} is" for i, w in enumerate(WORDS)]


def post(server: LiveServer, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", json=body, timeout=timeout)


async def post_all(server: LiveServer, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        responses = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json() for r in responses]


@pytest.mark.parametrize("sampled", [False, True])
def test_twenty_prompts_under_a_nested_schema_all_validate(tiny_server: LiveServer, sampled: bool) -> None:
    extra = {"do_sample": True, "temperature": 1.0, "seed": 11} if sampled else {}
    bodies = [{"prompt": p, "max_new_tokens": 200, "constraint": {"type": "json_schema", "schema": SCHEMA}, **extra}
              for p in PROMPTS]  # fmt: skip
    for body in asyncio.run(post_all(tiny_server, bodies)):
        g = body["generations"][0]
        assert g["finish_reason"] in ("stop", "eos") and g["constraint_complete"] is True, g
        jsonschema.validate(json.loads(g["text"]), SCHEMA)


@pytest.mark.parametrize("sampled", [False, True])
def test_regex_and_choice_outputs_match_in_full(tiny_server: LiveServer, sampled: bool) -> None:
    extra = {"do_sample": True, "temperature": 1.0, "seed": 5} if sampled else {}
    choices = ["positive", "negative", "neutral"]
    bodies = [{"prompt": p, "max_new_tokens": 30, **extra,
               "constraint": {"type": "regex", "pattern": DATE} if i % 2 else {"type": "choice", "choices": choices}}
              for i, p in enumerate(PROMPTS)]  # fmt: skip
    for i, body in enumerate(asyncio.run(post_all(tiny_server, bodies))):
        text = body["generations"][0]["text"]
        assert re.fullmatch(DATE, text) if i % 2 else text in choices, text
        assert body["generations"][0]["constraint_complete"] is True


def test_constrained_rows_leave_their_batch_mates_unchanged(tiny_server: LiveServer) -> None:
    """16 requests at once, half constrained: the others' tokens equal their runs alone, greedy and seeded."""
    plain = [{"prompt": p, "max_new_tokens": 24, "ignore_eos": True,
              **({"do_sample": True, "temperature": 0.9, "top_k": 40, "seed": i} if i % 2 else {})}
             for i, p in enumerate(PROMPTS[:8])]  # fmt: skip
    alone = [post(tiny_server, b).json()["generations"][0]["text"] for b in plain]
    constrained = [{"prompt": p, "max_new_tokens": 120, "constraint": {"type": "json_schema", "schema": SCHEMA},
                    **({"do_sample": True, "temperature": 1.0, "seed": 100 + i} if i % 2 else {})}
                   for i, p in enumerate(PROMPTS[8:16])]  # fmt: skip
    mixed = [b for pair in zip(plain, constrained, strict=True) for b in pair]
    out = asyncio.run(post_all(tiny_server, mixed))
    assert [o["generations"][0]["text"] for o in out[0::2]] == alone
    for o in out[1::2]:
        jsonschema.validate(json.loads(o["generations"][0]["text"]), SCHEMA)
    # and a constrained request alone writes what it wrote in the crowd, greedy and seeded
    for k in (0, 1):
        assert post(tiny_server, constrained[k]).json()["generations"][0]["text"] == out[2 * k + 1]["generations"][0][
            "text"]


def test_a_budget_too_small_says_the_output_is_incomplete(tiny_server: LiveServer) -> None:
    body = post(tiny_server, {"prompt": PROMPTS[0], "max_new_tokens": 3,
                              "constraint": {"type": "json_schema", "schema": SCHEMA}}).json()  # fmt: skip
    g = body["generations"][0]
    assert g["finish_reason"] == "length" and g["constraint_complete"] is False and g["completion_tokens"] == 3
    unconstrained = post(tiny_server, {"prompt": "x", "max_new_tokens": 3}).json()["generations"][0]
    assert unconstrained["constraint_complete"] is None


def test_streaming_a_constrained_request_sends_the_same_text(tiny_server: LiveServer) -> None:
    body = {"prompt": PROMPTS[3], "max_new_tokens": 120, "constraint": {"type": "json_schema", "schema": SCHEMA}}
    whole = post(tiny_server, body).json()["generations"][0]["text"]
    pieces, done = [], None
    with httpx.stream("POST", f"{tiny_server.url}/generate", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "token":
                    pieces.append(event["text"])
                elif event["type"] == "done":
                    done = event
    assert "".join(pieces) == whole and done is not None
    assert done["generations"][0]["constraint_complete"] is True


@pytest.mark.parametrize(
    ("constraint", "field", "needle"),
    [
        ({"type": "json_schema", "schema": {"type": "nope"}}, "constraint.schema", "invalid JSON schema"),
        ({"type": "json_schema", "schema": {"not": {"type": "string"}}}, "constraint.schema", "does not support"),
        ({"type": "regex", "pattern": "([0-9]"}, "constraint.pattern", "unclosed group"),
        ({"type": "regex", "pattern": "(?=a)b"}, "constraint.pattern", "look-around"),
        ({"type": "choice", "choices": []}, "constraint.choices", ""),
        ({"type": "choice", "choices": ["a", ""]}, "constraint.choices.1", ""),
        ({"type": "grammar", "value": "x"}, "constraint", ""),
        ({"type": "regex"}, "constraint.pattern", "required"),
    ],
)
def test_bad_constraints_are_422_naming_the_field(tiny_server: LiveServer, constraint: dict[str, Any], field: str,
                                                  needle: str) -> None:  # fmt: skip
    r = post(tiny_server, {"prompt": "Hello", "max_new_tokens": 5, "constraint": constraint})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and needle in error["message"], error


def test_a_bad_constraint_costs_no_other_request_its_answer(tiny_server: LiveServer) -> None:
    good = {"prompt": PROMPTS[1], "max_new_tokens": 20, "ignore_eos": True}
    expected = post(tiny_server, good).json()["generations"][0]["text"]

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=120) as client:
            bad = {"prompt": "x", "constraint": {"type": "json_schema", "schema": {"type": "nope"}}}
            return list(await asyncio.gather(*(client.post("/generate", json=b) for b in [good, bad, good, bad])))

    answers = asyncio.run(both())
    assert [r.status_code for r in answers] == [200, 422, 200, 422]
    assert [answers[i].json()["generations"][0]["text"] for i in (0, 2)] == [expected, expected]


def test_openai_response_format_through_the_official_client(tiny_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)
    out = client.completions.create(
        model="tiny-gpt2", prompt=PROMPTS[2], max_tokens=200, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}},
    )  # fmt: skip
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)
    assert out.choices[0].finish_reason == "stop"
    anything = client.completions.create(model="tiny-gpt2", prompt="Data:", max_tokens=40, temperature=0,
                                         extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
    # any object: random weights may write one number for ever, so only its start is certain
    text = anything.choices[0].text
    finish = anything.choices[0].finish_reason
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-gpt2", prompt="x", max_tokens=5, extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}})
    assert bad.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]


def test_mask_time_is_counted_in_info_and_metrics(tiny_server: LiveServer) -> None:
    def counters() -> tuple[float, float]:
        engine = httpx.get(f"{tiny_server.url}/info").json()["engine"]
        return engine["constraint_mask_steps"], engine["constraint_mask_seconds"]

    steps, seconds = counters()
    body = post(tiny_server, {"prompt": PROMPTS[4], "max_new_tokens": 30,
                              "constraint": {"type": "regex", "pattern": "[a-z]{40}"}}).json()  # fmt: skip
    n = body["generations"][0]["completion_tokens"]
    assert re.fullmatch("[a-z]+", body["generations"][0]["text"]) and 1 < n <= 30
    after_steps, after_seconds = counters()
    assert after_steps == steps + n and after_seconds > seconds  # one mask per token: the first, then each decode
    metrics = httpx.get(f"{tiny_server.url}/metrics").text
    line = next(line for line in metrics.splitlines() if line.startswith("textgen_constraint_mask_steps "))
    assert float(line.split()[1]) == after_steps
