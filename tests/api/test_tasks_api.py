"""/translate and /summarize over the engine: shapes, batching, prompts, truncation, 422s."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from app.config import Settings
from app.eval import trials
from app.models.loading.loader import LoadedModel
from app.tasks import summarize, translate
from app.tasks.family import family_of
from tests.conftest import LiveServer


def greedy_text(model: LoadedModel, ids: list[int], max_new: int, stop: str) -> str:
    with torch.inference_mode():
        out = model.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new,
                                   pad_token_id=model.info.eos_token_ids[0])  # fmt: skip
    text = model.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    return text.split(stop, 1)[0]


def test_translate_batch_matches_the_prompted_greedy_continuation(tiny_server: LiveServer, tiny: LoadedModel) -> None:
    texts = ["Good morning.", "The museum opens at nine."]
    r = httpx.post(f"{tiny_server.url}/translate", json={"texts": texts, "target_lang": "French"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source_lang"] == "en" and body["target_lang"] == "fr" and len(body["translations"]) == 2
    assert all(reason in {"length", "stop", "eos"} for reason in body["finish_reasons"])
    for text, got in zip(texts, body["translations"], strict=True):
        ids = translate.prompt_ids(tiny.tokenizer, family_of(tiny.tokenizer), text, "en", "fr")
        budget = 2 * len(tiny.tokenizer.encode(text)) + 16
        assert got == translate.postprocess(greedy_text(tiny, ids, budget, "\n"), "fr")
    assert body["usage"]["completion_tokens"] > 0


def test_base_model_translation_prompt_is_few_shot() -> None:
    class Tok:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            self.text = text
            return [1]

    for name, demo in (("everyday-3", "English: Where is the train station?\nGerman: Wo ist der Bahnhof?"),
                       ("news-3", "English: Police said the two men were arrested after a short chase.\nGerman:")):
        tok = Tok()
        translate.prompt_ids(tok, "base", "Hello there", "en", "de", name)
        assert tok.text.endswith("English: Hello there\nGerman:") and demo in tok.text


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        ({"text": "hi", "target_lang": "xx"}, "target_lang", "fr (French)"),
        ({"text": "hi", "target_lang": "fr", "source_lang": "klingon"}, "source_lang", "de (German)"),
        ({"text": "hi", "target_lang": "en"}, "target_lang", "same"),
        ({"text": "hi"}, "target_lang", "required"),
        ({"texts": ["a"] * 65, "target_lang": "fr"}, "texts", "64"),
        ({"text": "hi", "target_lang": "fr", "temperature": -1}, "temperature", ""),
    ],
)
def test_bad_translate_input_is_422(tiny_server: LiveServer, body: dict, field: str, needle: str) -> None:
    r = httpx.post(f"{tiny_server.url}/translate", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field and needle in r.json()["error"]["message"]


def test_summarize_cuts_long_articles_keeping_the_lead(tiny_server: LiveServer, tiny: LoadedModel) -> None:
    lead = "The council approved the new bridge on Monday after a long debate."
    long_article = lead + " " + "Residents spoke for and against the plan at length. " * 200  # > 1024 tokens
    short_article = "A cat was rescued from a tree by firefighters in the town centre on Sunday."
    r = httpx.post(f"{tiny_server.url}/summarize", json={"texts": [long_article, short_article],
                                                          "max_new_tokens": 20}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["truncated"] == [True, False]
    assert len(body["summaries"]) == 2 and all(reason in {"length", "stop", "eos"} for reason in body["finish_reasons"])
    p = summarize.prompt(tiny.tokenizer, "base", long_article, 1024 - 20)
    assert len(p.ids) <= 1004 and p.truncated
    assert tiny.tokenizer.decode(p.ids).startswith(lead) and len(tiny.tokenizer.decode(p.ids)) < len(long_article)
    assert body["usage"]["prompt_tokens"] == len(p.ids) + len(summarize.prompt(tiny.tokenizer, "base", short_article,
                                                                                 1004).ids)  # fmt: skip
    expected = summarize.postprocess(greedy_text(tiny, p.ids, 20, p.stop[0]))
    assert body["summaries"][0] == expected


def test_sampling_overrides_are_reproducible(tiny_server: LiveServer) -> None:
    body = {"text": "Good morning.", "target_lang": "de", "temperature": 1.0, "seed": 5, "max_new_tokens": 8}
    a = httpx.post(f"{tiny_server.url}/translate", json=body).json()
    b = httpx.post(f"{tiny_server.url}/translate", json=body).json()
    assert a["translations"] == b["translations"]


def test_the_prompt_choice_measures_what_the_endpoints_serve(tiny_server: LiveServer, tiny: LoadedModel,
                                                             tmp_path: Path) -> None:  # fmt: skip
    """app/eval/trials.py runs each candidate as /translate and /summarize run the chosen one: the served
    template's outputs there are the endpoints' answers, so a cross-validated figure is a figure of the API."""
    sources = ["Good morning.", "The museum opens at nine.", "Prices rose by two percent in May."]
    articles = ["A cat was rescued from a tree by firefighters in the town centre on Sunday.",
                "The council approved the new bridge on Monday. Work starts in May and ends next year."]  # fmt: skip
    engine = trials.engine_for(tiny, Settings(model="tiny-gpt2"))
    engine.start()
    try:
        cache = trials.Cache(tmp_path / "t.json", "tiny-gpt2", "fp32", [sources])
        hyps = trials.translations(engine, sources, ("fr", "de"), cache)
        summaries = trials.summaries(engine, articles, trials.Cache(None, "tiny-gpt2", "fp32", articles))
    finally:
        engine.stop()
    assert list(hyps) == list(translate.TEMPLATES["base"]) and list(summaries) == list(summarize.TEMPLATES["base"])
    for target in ("fr", "de"):
        r = httpx.post(f"{tiny_server.url}/translate", json={"texts": sources, "target_lang": target}, timeout=60)
        assert r.json()["translations"] == hyps[translate.CHOSEN["base"]][target]
    r = httpx.post(f"{tiny_server.url}/summarize", json={"texts": articles}, timeout=120)
    assert r.json()["summaries"] == summaries[summarize.CHOSEN["base"]]
    # kept outputs are reused (the stopped engine would fail any request), unless the inputs differ
    again = trials.Cache(tmp_path / "t.json", "tiny-gpt2", "fp32", [sources])
    assert trials.translations(engine, sources, ("fr", "de"), again) == hyps
    assert trials.Cache(tmp_path / "t.json", "tiny-gpt2", "fp32", [sources[:2]]).outputs == {}
