"""/sentiment: a scoring request through the engine, checked against transformers directly."""

from __future__ import annotations

import httpx
import pytest
import torch

from app.models.loading.loader import LoadedModel
from app.tasks import sentiment
from app.tasks.family import family_of
from tests.conftest import LiveServer

TEXTS = ["a charming and often affecting journey .", "the plot is a dull mess .", "it rained on tuesday"]


def direct_logprob(model: LoadedModel, prompt: list[int], continuation: tuple[int, ...]) -> float:
    ids = torch.tensor([prompt + list(continuation)])
    with torch.inference_mode():
        logp = model.model(ids).logits[0].float().log_softmax(-1)  # (L, V)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(continuation))


def direct(model: LoadedModel, text: str, labels: tuple[str, ...]) -> list[tuple[list[float], list[float]]]:
    """Per prompt of the ensemble: label log-likelihoods and their softmax, computed with transformers."""
    out = []
    for p in sentiment.build(model.tokenizer, family_of(model.tokenizer), text, labels):
        logprobs = [direct_logprob(model, p.ids, c) for c in p.continuations]
        out.append((logprobs, sentiment.softmax(logprobs)))
    return out


@pytest.mark.parametrize("labels", [("negative", "positive"), ("very negative", "rather positive", "neutral")])
def test_scores_match_transformers_and_calibration(tiny_server: LiveServer, tiny: LoadedModel, labels: tuple) -> None:
    r = httpx.post(f"{tiny_server.url}/sentiment", json={"texts": TEXTS, "labels": list(labels)}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-gpt2" and body["calibrated"] is True and len(body["results"]) == len(TEXTS)
    # a base model: the few-shot prompt cross-validation chose for the usual label pair, else the plain one
    assert body["prompts"] == (["few-shot-b"] if labels == ("negative", "positive") else ["plain"])
    free = [direct(tiny, t, labels) for t in sentiment.CONTENT_FREE]
    priors = [sentiment.mean_distribution([f[k][1] for f in free]) for k in range(len(body["prompts"]))]
    for text, result in zip(TEXTS, body["results"], strict=True):
        per_prompt = direct(tiny, text, labels)
        for k, (logprobs, _) in enumerate(per_prompt):
            for label, expected in zip(labels, logprobs, strict=True):
                assert result["logprobs"][label][k] == pytest.approx(expected, abs=1e-4)
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-9)
        assert sum(result["uncalibrated"].values()) == pytest.approx(1.0, abs=1e-9)
        expected_cal = sentiment.mean_distribution(
            [sentiment.calibrate(raw, prior) for (_, raw), prior in zip(per_prompt, priors, strict=True)]
        )
        assert [result["scores"][label] for label in labels] == pytest.approx(expected_cal, abs=1e-4)
        assert result["label"] == max(labels, key=lambda label: result["scores"][label])
        assert result["score"] == result["scores"][result["label"]]


def test_uncalibrated_when_asked(tiny_server: LiveServer) -> None:
    r = httpx.post(f"{tiny_server.url}/sentiment", json={"text": TEXTS[0], "calibrate": False})
    result = r.json()["results"][0]
    assert r.json()["calibrated"] is False and result["scores"] == result["uncalibrated"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "text"),
        ({"text": "a", "texts": ["b"]}, "texts"),
        ({"texts": []}, "texts"),
        ({"texts": ["x"] * 65}, "texts"),
        ({"text": "   "}, "text"),
        ({"text": "ok", "labels": ["good"]}, "labels"),
        ({"text": "ok", "labels": ["good", "good"]}, "labels"),
        ({"text": "ok", "labels": ["good", ""]}, "labels"),
    ],
)
def test_bad_sentiment_input_is_422(tiny_server: LiveServer, body: dict, field: str) -> None:
    r = httpx.post(f"{tiny_server.url}/sentiment", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


@pytest.mark.smollm
def test_smollm_gets_obvious_sentiment_right(smollm: LoadedModel) -> None:
    from tests.conftest import live_server

    texts = ["I loved this film, it was wonderful and moving.", "A boring, awful waste of two hours.",
             "the best meal i have had in years", "terrible service and cold food"]  # fmt: skip
    with live_server(smollm) as server:
        r = httpx.post(f"{server.url}/sentiment", json={"texts": texts}, timeout=120)
    assert [x["label"] for x in r.json()["results"]] == ["positive", "negative", "positive", "negative"]


def test_label_priors_are_kept_in_the_apps_state(tiny_server: LiveServer) -> None:
    # computed once per label set and kept through Starlette's State (not written around it)
    labels = ("awful", "great")
    r = httpx.post(f"{tiny_server.url}/sentiment", json={"text": TEXTS[0], "labels": list(labels)}, timeout=60)
    assert r.status_code == 200, r.text
    state = tiny_server.app.state
    assert labels in state._state["calibration"]
    assert len(state.calibration[labels]) == len(r.json()["prompts"])
