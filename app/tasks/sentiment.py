"""Sentiment as scoring: the log-likelihood of each label after a prompt, calibrated and ensembled.

- Scoring, not generation: each label is a continuation whose token log-probabilities are summed.
- Contextual calibration (Zhao et al., 2021, "Calibrate Before Use"): the label probabilities the model
  gives content-free inputs ("N/A", "", "[MASK]") measure its bias toward each label; dividing by them
  and renormalising removes it, so the text, not the label prior, decides.
- Prompt ensemble: a small model's answer depends on the wording of the question and on the order of
  its demonstrations; averaging the distributions of a few prompts is steadier than any one of them.
  For the usual negative/positive pair the prompts carry eight demonstrations written for this module
  (films, products, restaurants; full sentences and SST-style fragments), never taken from an evaluation
  set, in three orders.
- Which prompts, and whether to calibrate, was chosen per model family by 5-fold cross-validation on
  SST-2 dev (app/eval/choose.py): chosen on four folds, scored on the fifth, rotated. SmolLM2-135M-Instruct
  (chat): 83.7% cross-validated (folds 80.5-88.5%), four prompts uncalibrated; gemma-3-270m (base): 89.7%
  (folds 85.1-92.0%), one few-shot prompt, calibrated. An earlier choice, made and checked on dev rows,
  gave 81.7% there and 76.6% on SST-2 rows the project had not seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from app.tasks.family import Family, base_prompt_ids

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


# Orders of the demonstrations: a small model's answer moves by points with their order alone, so the
# candidates hold three (the ensemble may average over them).
ORDERS = {"a": (0, 1, 2, 3, 4, 5, 6, 7), "b": (7, 6, 5, 4, 3, 2, 1, 0), "c": (3, 0, 6, 1, 4, 7, 2, 5)}

# The prompts ensembled by default, and whether their distributions are calibrated, per model family:
# chosen by 5-fold cross-validation on SST-2 dev (app/eval/choose.py; docs/tasks.md has the figures).
ENSEMBLE: dict[Family, tuple[str, ...]] = {
    "chat": ("instruction", "few-shot-a", "few-shot-list-a", "few-shot-b"),  # SmolLM2-135M-Instruct
    "base": ("few-shot-b",),  # gemma-3-270m
}
CALIBRATE: dict[Family, bool] = {"chat": False, "base": True}
# labels other than the usual pair have no demonstrations
NO_DEMOS: dict[Family, tuple[str, ...]] = {"chat": ("instruction", "answer-sentence"), "base": ("plain",)}


def build(tokenizer: Any, family: Family, text: str, labels: tuple[str, ...],
          names: tuple[str, ...] | None = None) -> list[Prompt]:  # fmt: skip
    """The prompts whose label distributions are averaged: `names` among `candidates`, by default the
    family's ENSEMBLE (NO_DEMOS for labels the demonstrations do not use)."""
    if names is None:
        names = ENSEMBLE[family] if _demos(labels) else NO_DEMOS[family]
    return candidates(tokenizer, family, text, labels, names)


def candidates(tokenizer: Any, family: Family, text: str, labels: tuple[str, ...],
               names: tuple[str, ...] | None = None) -> list[Prompt]:  # fmt: skip
    """Every prompt this module can ask with, for this model family (only those in `names`, when given:
    each is tokenized on the request path, so the others are not built at all).

    Every prompt ends with the text, so the part before it is the same for all texts and the engine's
    prefix cache computes it once.
    """
    demos = _demos(labels)
    orders = {k: [demos[i] for i in order] for k, order in ORDERS.items()} if demos else {}
    if names is not None:  # an order is built when a prompt in it is wanted
        orders = {k: v for k, v in orders.items() if any(n.endswith(f"-{k}") for n in names)}
    prompts = []
    if family == "chat":
        user = _question(text, labels)
        prompts.append(Prompt("instruction", _chat(tokenizer, [{"role": "user", "content": user}]),
                              _tokens(tokenizer, labels, "")))  # fmt: skip
        for key, shown in orders.items():
            # the demonstrations as earlier turns of the conversation...
            turns = []
            for demo, label in shown:
                turns += [{"role": "user", "content": _question(demo, labels)}, {"role": "assistant", "content": label}]
            turns.append({"role": "user", "content": user})
            prompts.append(Prompt(f"few-shot-{key}", _chat(tokenizer, turns), _tokens(tokenizer, labels, "")))
            # ...and as a list inside one message
            shots = "\n".join(f"Text: {demo}\nSentiment: {label}\n" for demo, label in shown)
            listed = (f"Classify the sentiment of each text as {' or '.join(labels)}.\n\n{shots}\n"
                      f"Text: {text.strip()}\nSentiment:")  # fmt: skip
            prompts.append(Prompt(f"few-shot-list-{key}", _chat(tokenizer, [{"role": "user", "content": listed}]),
                                  _tokens(tokenizer, labels, "")))  # fmt: skip
        ask = f"Is the sentiment of this text {' or '.join(labels)}?\n\nText: {text.strip()}"
        prompts.append(Prompt("answer-sentence",
                              _chat(tokenizer, [{"role": "user", "content": ask}], "The sentiment of this text is"),
                              _tokens(tokenizer, labels, " ")))  # fmt: skip
    else:
        plain = f"Text: {text.strip()}\nSentiment:"
        prompts.append(Prompt("plain", base_prompt_ids(tokenizer, plain), _tokens(tokenizer, labels, " ")))
        for key, shown in orders.items():
            shots = "".join(f"Text: {demo}\nSentiment: {label}\n\n" for demo, label in shown)
            prompts.append(Prompt(f"few-shot-{key}", base_prompt_ids(tokenizer, shots + plain),
                                  _tokens(tokenizer, labels, " ")))  # fmt: skip
    return prompts if names is None else [p for p in prompts if p.name in names]


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
