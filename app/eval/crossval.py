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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

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


C = TypeVar("C")


def best_by(candidates: Sequence[C], metric: Callable[[C, Sequence[int]], float], rows: Sequence[int],
            tie: Callable[[C], float] = lambda c: 0.0) -> C:  # fmt: skip
    """The candidate with the best `metric` on `rows`; ties go to the higher `tie`, then the earlier candidate."""
    return max(candidates, key=lambda c: (round(metric(c, rows), 9), tie(c)))


def choose(scored: Scored, candidates: Sequence[Config], rows: Sequence[int]) -> Config:
    """The best configuration on `rows`; ties go to the smaller ensemble, then to the earlier candidate."""
    return best_by(candidates, lambda c, r: accuracy(scored, c, r), rows, tie=lambda c: -len(c.prompts))


@dataclass(frozen=True)
class Fold(Generic[C]):
    chosen: C
    train_score: float
    held_out_score: float
    size: int


def split(n: int, k: int, seed: int = 0) -> list[list[int]]:
    """Row indices 0..n-1 shuffled (seeded) into k folds of near-equal size."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[f::k] for f in range(k)]


def cross_validate_by(candidates: Sequence[C], metric: Callable[[C, Sequence[int]], float], n: int, k: int = 5,
                      seed: int = 0, tie: Callable[[C], float] = lambda c: 0.0) -> list[Fold[C]]:
    """Per fold: the candidate with the best `metric` on the other folds' rows (ties: the higher `tie`, then
    the earlier candidate), and its metric on the held-out fold's rows."""
    folds = split(n, k, seed)
    out = []
    for f, held in enumerate(folds):
        train = [i for g, fold in enumerate(folds) if g != f for i in fold]
        best = best_by(candidates, metric, train, tie)
        out.append(Fold(best, metric(best, train), metric(best, held), len(held)))
    return out


def cross_validate(scored: Scored, candidates: Sequence[Config], k: int = 5, seed: int = 0) -> list[Fold[Config]]:
    """Sentiment configurations by accuracy; ties go to the smaller ensemble (as `choose`)."""
    return cross_validate_by(candidates, lambda c, rows: accuracy(scored, c, rows), len(scored.gold), k, seed,
                             tie=lambda c: -len(c.prompts))  # fmt: skip
