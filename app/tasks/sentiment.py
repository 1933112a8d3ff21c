"""Sentiment as scoring: the log-likelihood of each label after a prompt, calibrated and ensembled.

- Scoring, not generation: each label is a continuation whose token log-probabilities are summed.
- Contextual calibration (Zhao et al., 2021, "Calibrate Before Use"): the label probabilities the model
  gives content-free inputs ("N/A", "", "[MASK]") measure its bias toward each label; dividing by them
  and renormalising removes it, so the text, not the label prior, decides.
- Prompt ensemble: a small model's answer depends on the wording of the question; averaging the
  calibrated distributions of a few differently worded prompts is steadier than any one of them.
  For the usual negative/positive pair the chat prompts get eight demonstrations written for this
  module (films, products, restaurants; full sentences and SST-style fragments), never taken from an
  evaluation set. Chosen on SST-2 dev rows 0-199 and checked on rows 200-435, held out while choosing:
  SmolLM2-135M-Instruct went from 80.9% (instruction + answer-sentence + two-demo few-shot) to 82.6%
  there with the three chat prompts below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from app.tasks.family import Family

CONTENT_FREE = ("N/A", "", "[MASK]")

# Demonstrations for the few-shot prompts, used only for the usual binary label pair; the labels
# alternate irregularly so that neither is always the latest one the model saw.
DEMOS = (
    ("A warm, funny and beautifully acted film that stays with you.", "positive"),
    ("The plot is predictable and the jokes fall flat.", "negative"),
    ("It stopped working after a week and support never replied.", "negative"),
    ("The battery lasts all day and the screen is gorgeous.", "positive"),
    ("one of the most inventive and moving stories in years", "positive"),
    ("a tedious, overlong mess with nothing to say", "negative"),
    ("Cold food, rude service, and we waited an hour.", "negative"),
    ("Friendly staff, fresh food, and fair prices.", "positive"),
)
DEMO_LABELS = ("negative", "positive")


@dataclass(frozen=True)
class Prompt:
    name: str
    ids: list[int]
    continuations: tuple[tuple[int, ...], ...]  # one per label


def _question(text: str, labels: tuple[str, ...]) -> str:
    return (f"What is the sentiment of the following text? Answer with one word from: {', '.join(labels)}.\n\n"
            f"Text: {text.strip()}")  # fmt: skip


def _chat(tokenizer: Any, messages: list[dict[str, str]], reply_prefix: str = "") -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + reply_prefix
    return list(tokenizer.encode(text, add_special_tokens=False))


def _tokens(tokenizer: Any, words: tuple[str, ...], prefix: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(tokenizer.encode(prefix + w, add_special_tokens=False)) for w in words)


def _demos(labels: tuple[str, ...]) -> list[tuple[str, str]]:
    """The demonstrations with the caller's spelling of the labels, if the labels are the usual pair."""
    by_lower = {label.lower(): label for label in labels}
    if sorted(by_lower) != sorted(DEMO_LABELS) or len(labels) != len(DEMO_LABELS):
        return []
    return [(text, by_lower[label]) for text, label in DEMOS]


def build(tokenizer: Any, family: Family, text: str, labels: tuple[str, ...]) -> list[Prompt]:
    """The prompts whose calibrated label distributions are averaged, for this model family.

    Every prompt ends with the text, so the part before it is the same for all texts and the engine's
    prefix cache computes it once.
    """
    demos = _demos(labels)
    prompts = []
    if family == "chat":
        user = _question(text, labels)
        prompts.append(Prompt("instruction", _chat(tokenizer, [{"role": "user", "content": user}]),
                              _tokens(tokenizer, labels, "")))  # fmt: skip
        if demos:
            # the demonstrations as earlier turns of the conversation...
            turns = []
            for demo, label in demos:
                turns += [{"role": "user", "content": _question(demo, labels)}, {"role": "assistant", "content": label}]
            turns.append({"role": "user", "content": user})
            prompts.append(Prompt("few-shot", _chat(tokenizer, turns), _tokens(tokenizer, labels, "")))
            # ...and as a list inside one message
            shots = "\n".join(f"Text: {demo}\nSentiment: {label}\n" for demo, label in demos)
            listed = (f"Classify the sentiment of each text as {' or '.join(labels)}.\n\n{shots}\n"
                      f"Text: {text.strip()}\nSentiment:")  # fmt: skip
            prompts.append(Prompt("few-shot-list", _chat(tokenizer, [{"role": "user", "content": listed}]),
                                  _tokens(tokenizer, labels, "")))  # fmt: skip
        else:
            ask = f"Is the sentiment of this text {' or '.join(labels)}?\n\nText: {text.strip()}"
            prompts.append(Prompt("answer-sentence",
                                  _chat(tokenizer, [{"role": "user", "content": ask}], "The sentiment of this text is"),
                                  _tokens(tokenizer, labels, " ")))  # fmt: skip
    else:
        plain = f"Text: {text.strip()}\nSentiment:"
        prompts.append(Prompt("plain", list(tokenizer.encode(plain, add_special_tokens=False)),
                              _tokens(tokenizer, labels, " ")))  # fmt: skip
        if demos:
            shots = "".join(f"Text: {demo}\nSentiment: {label}\n\n" for demo, label in demos)
            prompts.append(Prompt("few-shot", list(tokenizer.encode(shots + plain, add_special_tokens=False)),
                                  _tokens(tokenizer, labels, " ")))  # fmt: skip
    return prompts


def softmax(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    exps = [math.exp(x - top) for x in logprobs]
    total = sum(exps)
    return [e / total for e in exps]


def calibrate(probs: list[float], content_free: list[float]) -> list[float]:
    """p(label | text) / p(label | content-free), renormalised."""
    raw = [p / max(q, 1e-12) for p, q in zip(probs, content_free, strict=True)]
    total = sum(raw)
    return [r / total for r in raw]


def mean_distribution(distributions: list[list[float]]) -> list[float]:
    n = len(distributions)
    return [sum(d[i] for d in distributions) / n for i in range(len(distributions[0]))]
