"""Choosing a task's prompts so the choice generalizes: k-fold cross-validation over cached scores.

Every candidate prompt scores every dev example once; choosing is then arithmetic. A configuration is a
set of prompts whose (optionally calibrated) label distributions are averaged. Each fold's configuration
is chosen on the other k - 1 folds and scored on the one left out, so the reported accuracy is never a
score on rows that took part in the choosing; the spread over folds says how much the choice moves. The
configuration a server ships is chosen the same way on all rows: the cross-validated accuracy estimates
how that procedure does on rows it has not seen.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from app.tasks.sentiment import calibrate, mean_distribution, softmax


@dataclass(frozen=True)
class Config:
    prompts: tuple[str, ...]
    calibrated: bool

    def __str__(self) -> str:
        return f"{'+'.join(self.prompts)} ({'calibrated' if self.calibrated else 'uncalibrated'})"


@dataclass(frozen=True)
class Scored:
    """Per example, per candidate prompt: the label log-likelihoods; per prompt: the content-free prior."""

    names: tuple[str, ...]
    logprobs: list[dict[str, list[float]]]  # example -> prompt -> per-label summed log-probability
    priors: dict[str, list[float]]  # prompt -> label distribution for content-free inputs
    gold: list[int]


def configs(names: Sequence[str], max_size: int = 4) -> list[Config]:
    return [Config(tuple(c), cal) for n in range(1, max_size + 1) for c in itertools.combinations(names, n)
            for cal in (True, False)]  # fmt: skip


def predict(scored: Scored, config: Config, rows: Sequence[int]) -> list[int]:
    out = []
    for i in rows:
        dists = []
        for name in config.prompts:
            dist = softmax(scored.logprobs[i][name])
            dists.append(calibrate(dist, scored.priors[name]) if config.calibrated else dist)
        mean = mean_distribution(dists)
        out.append(max(range(len(mean)), key=lambda k: mean[k]))
    return out


def accuracy(scored: Scored, config: Config, rows: Sequence[int]) -> float:
    preds = predict(scored, config, rows)
    return sum(p == scored.gold[i] for p, i in zip(preds, rows, strict=True)) / max(len(rows), 1)


def choose(scored: Scored, candidates: Sequence[Config], rows: Sequence[int]) -> Config:
    """The best configuration on `rows`; ties go to the smaller ensemble, then to the earlier candidate."""
    return max(candidates, key=lambda c: (round(accuracy(scored, c, rows), 9), -len(c.prompts)))


@dataclass(frozen=True)
class Fold:
    chosen: Config
    train_accuracy: float
    held_out_accuracy: float
    size: int


def cross_validate(scored: Scored, candidates: Sequence[Config], k: int = 5, seed: int = 0) -> list[Fold]:
    order = list(range(len(scored.gold)))
    random.Random(seed).shuffle(order)
    folds = [order[f::k] for f in range(k)]
    out = []
    for f, held in enumerate(folds):
        train = [i for g, fold in enumerate(folds) if g != f for i in fold]
        best = choose(scored, candidates, train)
        out.append(Fold(best, accuracy(scored, best, train), accuracy(scored, best, held), len(held)))
    return out
