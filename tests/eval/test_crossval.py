"""Cross-validated prompt choice: each fold is chosen without its held-out rows, and scored on them only."""

from __future__ import annotations

import math
import random

from app.eval import crossval


def _scored(n: int, right: dict[str, set[int] | None], seed: int = 0) -> crossval.Scored:
    """Per prompt, the rows it gets right (None: every row); elsewhere it is confidently wrong."""
    rng = random.Random(seed)
    gold = [rng.randrange(2) for _ in range(n)]
    logprobs = []
    for i in range(n):
        row = {}
        for name, rows in right.items():
            ok = rows is None or i in rows
            answer = gold[i] if ok else 1 - gold[i]
            row[name] = [math.log(0.9) if k == answer else math.log(0.1) for k in range(2)]
        logprobs.append(row)
    return crossval.Scored(tuple(right), logprobs, {name: [0.5, 0.5] for name in right}, gold)


def test_the_prompt_that_is_right_everywhere_wins_every_fold() -> None:
    scored = _scored(100, {"good": None, "half": set(range(50))})
    folds = crossval.cross_validate(scored, crossval.configs(scored.names, 1), k=5)
    assert all(f.chosen.prompts == ("good",) and f.held_out_score == 1.0 for f in folds)
    assert sum(f.size for f in folds) == 100


def test_held_out_rows_take_no_part_in_the_choice() -> None:
    # "lucky" is right on exactly the rows of fold 0 and wrong elsewhere; "steady" is right on 70% of all rows.
    order = list(range(100))
    random.Random(0).shuffle(order)  # cross_validate's own shuffle (seed 0)
    fold0 = set(order[0::5])
    steady = set(random.Random(1).sample(range(100), 70))
    scored = _scored(100, {"lucky": fold0, "steady": steady})
    folds = crossval.cross_validate(scored, crossval.configs(scored.names, 1), k=5, seed=0)
    # choosing on the other folds picks steady; lucky's perfect score on fold 0 is never seen while choosing it
    assert folds[0].chosen.prompts == ("steady",)
    assert folds[0].held_out_score == len(steady & fold0) / len(fold0)
    # in-sample, on fold 0's rows alone, lucky would have looked perfect
    assert crossval.accuracy(scored, crossval.Config(("lucky",), False), sorted(fold0)) == 1.0


def test_ties_go_to_the_smaller_ensemble() -> None:
    scored = _scored(40, {"a": None, "b": None})
    assert crossval.choose(scored, crossval.configs(scored.names, 2), range(40)).prompts == ("a",)


def test_each_fold_is_chosen_on_the_other_folds_rows_only() -> None:
    seen: list[set[int]] = []

    def metric(candidate: str, rows: object) -> float:
        seen.append(set(rows))  # type: ignore[call-overload]
        return {"a": 1.0, "b": 0.0}[candidate]

    folds = crossval.cross_validate_by(["b", "a"], metric, 23, k=5, seed=3)
    split = crossval.split(23, 5, seed=3)
    assert sorted(i for fold in split for i in fold) == list(range(23))
    assert [f.chosen for f in folds] == ["a"] * 5 and [f.size for f in folds] == [len(s) for s in split]
    for f, held in enumerate(split):
        # per fold: both candidates on the training rows, the chosen one again on them, then on the held-out rows
        calls = seen[4 * f : 4 * f + 4]
        assert all(c.isdisjoint(held) and len(c) == 23 - len(held) for c in calls[:3])
        assert calls[3] == set(held)


def test_ties_between_templates_go_to_the_earlier_candidate() -> None:
    assert crossval.best_by(["x", "y"], lambda c, rows: 0.5, range(4)) == "x"
    assert crossval.best_by(["x", "y"], lambda c, rows: 0.5, range(4), tie=lambda c: c == "y") == "y"
