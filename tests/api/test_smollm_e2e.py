"""End to end with the real offline default model: a few golden checks over real HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.models.loader import LoadedModel
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
