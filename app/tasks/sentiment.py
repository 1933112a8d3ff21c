"""Sentiment as scoring: the log-likelihood of each label after a prompt, calibrated and ensembled.

- Scoring, not generation: each label is a continuation whose token log-probabilities are summed.
- Contextual calibration (Zhao et al., 2021, "Calibrate Before Use"): the label probabilities the model
  gives content-free inputs ("N/A", "", "[MASK]") measure its bias toward each label; dividing by them
  and renormalising removes it, so the text, not the label prior, decides.
- Prompt ensemble: a small model's answer depends on the wording of the question; averaging the
  calibrated distributions of a few differently worded prompts is steadier than any one of them.
  On the SST-2 dev rows 200-435 (held out while choosing), SmolLM2-135M-Instruct went from 75.0%
  with the first prompt alone to 84.7% with the three below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from app.tasks.family import Family

CONTENT_FREE = ("N/A", "", "[MASK]")

# Demonstrations for the few-shot prompt, used only for the usual binary label pair.
DEMOS = {
    "positive": "I really enjoyed this, it was wonderful from start to finish.",
    "negative": "This was a waste of time and money, and I regret it.",
}


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


def _has_demos(labels: tuple[str, ...]) -> bool:
    return sorted(label.lower() for label in labels) == sorted(DEMOS)


def build(tokenizer: Any, family: Family, text: str, labels: tuple[str, ...]) -> list[Prompt]:
    """The prompts whose calibrated label distributions are averaged, for this model family."""
    demos = [(DEMOS[label.lower()], label) for label in labels] if _has_demos(labels) else []
    prompts = []
    if family == "chat":
        user = _question(text, labels)
        prompts.append(Prompt("instruction", _chat(tokenizer, [{"role": "user", "content": user}]),
                              _tokens(tokenizer, labels, "")))  # fmt: skip
        ask = f"Is the sentiment of this text {' or '.join(labels)}?\n\nText: {text.strip()}"
        prompts.append(Prompt("answer-sentence",
                              _chat(tokenizer, [{"role": "user", "content": ask}], "The sentiment of this text is"),
                              _tokens(tokenizer, labels, " ")))  # fmt: skip
        if demos:
            turns = []
            for demo, label in demos:
                turns += [{"role": "user", "content": _question(demo, labels)}, {"role": "assistant", "content": label}]
            turns.append({"role": "user", "content": user})
            prompts.append(Prompt("few-shot", _chat(tokenizer, turns), _tokens(tokenizer, labels, "")))
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
