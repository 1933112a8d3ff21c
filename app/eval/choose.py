"""Choose the task prompts by k-fold cross-validation on the dev files, in-process (no HTTP).

    python -m app.eval.choose --task sentiment --model smollm2-135m-instruct --data ../shared/data/sst2/dev.tsv
    python -m app.eval.choose --task translate --model gemma-3-270m --data ../shared/data/translation/ntrex_dev.tsv
    python -m app.eval.choose --task summarize --model gemma-3-270m \
        --data ../shared/data/summarization/frank_validation.jsonl

Sentiment: every candidate prompt of app/tasks/sentiment.py scores every sentence once (and the content-free
inputs the calibration divides by); every ensemble of up to --max-size prompts, calibrated or not, is a
configuration. Translate / summarize: every candidate template of the model's family (translate.TEMPLATES,
summarize.TEMPLATES) generates for every row once, greedy (app/eval/trials.py); the metric is chrF (mean of
en->fr and en->de) / ROUGE-L. Each fold's choice is made on the other folds and scored on the one left out;
the cross-validated figure pools each row's held-out result. Printed: each candidate in-sample (for reading,
not for choosing), each fold's choice, the cross-validated figures with the folds' spread, and the choice on
all rows: what ENSEMBLE / CHOSEN should hold.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from app.config import Settings
from app.engine.engine import Engine
from app.engine.types import RequestFailed, ScoreRequest, Scores
from app.eval import crossval, trials
from app.eval.baselines import lead3
from app.tasks import sentiment
from app.tasks.family import family_of

LABELS = ("negative", "positive")
CacheFor = Callable[[object], trials.Cache]  # the task's inputs -> the cache of its outputs
TARGETS = ("fr", "de")
TRANSLATE_ROWS = 100  # NTREX sentences, unless --limit: 4 templates x 2 directions x 100 = 800 generations


@dataclass
class Report:
    """A task's cross-validated figures (percentages), for the one-table summary of textgen eval report."""

    task: str
    rows: int
    figures: dict[str, float]  # cross-validated (pooled over held-out rows)
    baselines: dict[str, float] = field(default_factory=dict)
    folds: list[float] = field(default_factory=list)  # the choice metric, per held-out fold
    chosen: str = ""  # on all rows


def _spread(folds: Sequence[float]) -> str:
    return f"folds {min(folds):.1f}-{max(folds):.1f}, sd {statistics.stdev(folds):.1f}" if len(folds) > 1 else ""


def _print_folds(folds: Sequence[crossval.Fold[Any]], unit: str) -> None:
    for f, fold in enumerate(folds):
        print(f"  fold {f}: held out {fold.held_out_score:6.1f} ({fold.size} rows), chosen on the rest "
              f"({fold.train_score:.1f} {unit}): {fold.chosen}")  # fmt: skip


def held_out_choice(folds: Sequence[crossval.Fold[Any]], n: int, k: int, seed: int) -> list[Any]:
    """Per row: the candidate chosen by the fold that held the row out."""
    chosen: list[Any] = [None] * n
    for fold, rows in zip(folds, crossval.split(n, k, seed), strict=True):
        for i in rows:
            chosen[i] = fold.chosen
    return chosen


# -- sentiment: scoring ------------------------------------------------------------------------------------


async def _score_all(engine: Engine, requests: list[ScoreRequest], at_once: int = 64) -> list[list[float]]:
    import asyncio

    gate = asyncio.Semaphore(at_once)

    async def one(request: ScoreRequest) -> list[float]:
        async with gate:
            found: list[float] | None = None
            async for event in await engine.submit(request):
                if isinstance(event, Scores):
                    found = list(event.logprobs)
                elif isinstance(event, RequestFailed):
                    raise event.error
            assert found is not None
            return found

    return list(await asyncio.gather(*(one(r) for r in requests)))


def score(engine: Engine, texts: list[str], gold: list[int]) -> crossval.Scored:
    import asyncio

    tokenizer = engine.tokenizer
    family = family_of(tokenizer)
    per_text = [sentiment.candidates(tokenizer, family, t, LABELS) for t in texts]
    names = tuple(p.name for p in per_text[0])
    free = [sentiment.candidates(tokenizer, family, t, LABELS) for t in sentiment.CONTENT_FREE]
    flat = [p for prompts in per_text + free for p in prompts]
    results = asyncio.run(_score_all(engine, [ScoreRequest(p.ids, p.continuations) for p in flat]))
    n = len(names)
    logprobs = [dict(zip(names, results[i * n : (i + 1) * n], strict=True)) for i in range(len(texts))]
    tail = results[len(texts) * n :]
    priors = {name: sentiment.mean_distribution([sentiment.softmax(tail[j * n + k]) for j in range(len(free))])
              for k, name in enumerate(names)}  # fmt: skip
    return crossval.Scored(names, logprobs, priors, gold)


def choose_sentiment(engine: Engine, data: Path, args: argparse.Namespace, cache_for: CacheFor) -> Report:
    with data.open(newline="") as fh:
        rows = [(r["sentence"], int(r["label"])) for r in csv.DictReader(fh, delimiter="\t")][: args.limit]
    cache = cache_for(rows)

    def run() -> dict[str, Any]:
        got = score(engine, [t for t, _ in rows], [y for _, y in rows])
        return {"names": got.names, "logprobs": got.logprobs, "priors": got.priors, "gold": got.gold}

    kept = cache.get("scores", run)
    scored = crossval.Scored(tuple(kept["names"]), kept["logprobs"], kept["priors"], kept["gold"])
    every = list(range(len(rows)))
    print(f"sentiment: SST-2 {data}, {len(rows)} sentences, {len(scored.names)} candidate prompts")
    for name in scored.names:
        print(f"  {name:22} calibrated {crossval.accuracy(scored, crossval.Config((name,), True), every):6.1%}  "
              f"uncalibrated {crossval.accuracy(scored, crossval.Config((name,), False), every):6.1%}")
    candidates = crossval.configs(scored.names, args.max_size)
    folds = crossval.cross_validate(scored, candidates, args.folds, args.seed)
    folds = [crossval.Fold(f.chosen, 100 * f.train_score, 100 * f.held_out_score, f.size) for f in folds]
    print(f"{args.folds}-fold cross-validation over {len(candidates)} configurations:")
    _print_folds(folds, "%")
    per_row = held_out_choice(folds, len(rows), args.folds, args.seed)
    pooled = 100 * sum(crossval.predict(scored, c, [i])[0] == scored.gold[i] for i, c in enumerate(per_row)) / len(rows)
    held = [f.held_out_score for f in folds]
    final = crossval.choose(scored, candidates, every)
    print(f"cross-validated accuracy {pooled:.1f}% ({_spread(held)}); chosen on all rows: {final}")
    return Report("sentiment", len(rows), {"accuracy": pooled}, folds=held, chosen=str(final))


# -- translation and summarization: generation -------------------------------------------------------------


def _templates(names: list[str], metric: Callable[[str, Sequence[int]], float], n: int, args: argparse.Namespace,
               unit: str) -> tuple[list[crossval.Fold[str]], list[str], str]:  # fmt: skip
    """Each template in-sample (printed, for reading), then cross-validated: the folds, each row's held-out
    choice, and the choice on all rows."""
    every = list(range(n))
    for name in names:
        print(f"  {name:24} {unit} {metric(name, every):5.1f}")
    folds = crossval.cross_validate_by(names, metric, n, args.folds, args.seed)
    print(f"{args.folds}-fold cross-validation over {len(names)} templates:")
    _print_folds(folds, unit)
    return folds, held_out_choice(folds, n, args.folds, args.seed), crossval.best_by(names, metric, every)


def choose_translate(engine: Engine, data: Path, args: argparse.Namespace, cache_for: CacheFor) -> Report:
    import sacrebleu

    with data.open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[: args.limit or TRANSLATE_ROWS]
    sources = [r["en"] for r in rows]
    refs = {t: [r[t] for r in rows] for t in TARGETS}
    hyps = trials.translations(engine, sources, TARGETS, cache_for([sources, TARGETS]))
    names = list(hyps)

    def chrf(name: str, idx: Sequence[int]) -> float:
        return statistics.mean(sacrebleu.corpus_chrf([hyps[name][t][i] for i in idx], [[refs[t][i] for i in idx]]).score
                               for t in TARGETS)  # fmt: skip

    print(f"translate: NTREX {data}, first {len(rows)} sentences, en->{'/'.join(TARGETS)}, metric chrF (mean)")
    folds, per_row, final = _templates(names, chrf, len(rows), args, "chrF")
    figures, baselines = {}, {}
    for t in TARGETS:
        pooled = [hyps[c][t][i] for i, c in enumerate(per_row)]
        figures[f"en-{t} BLEU"] = sacrebleu.corpus_bleu(pooled, [refs[t]]).score
        figures[f"en-{t} chrF"] = sacrebleu.corpus_chrf(pooled, [refs[t]]).score
        baselines[f"en-{t} BLEU"] = sacrebleu.corpus_bleu(sources, [refs[t]]).score
        baselines[f"en-{t} chrF"] = sacrebleu.corpus_chrf(sources, [refs[t]]).score
    held = [f.held_out_score for f in folds]
    print("cross-validated: " + ", ".join(f"{k} {v:.1f} (copy-source {baselines[k]:.1f})" for k, v in figures.items())
          + f"; chrF {_spread(held)}; chosen on all rows: {final}")  # fmt: skip
    return Report("translate", len(rows), figures, baselines, held, final)


def choose_summarize(engine: Engine, data: Path, args: argparse.Namespace, cache_for: CacheFor) -> Report:
    from rouge_score import rouge_scorer


    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()][: args.limit]
    articles = [r["article"] for r in rows]
    outputs = trials.summaries(engine, articles, cache_for(articles))
    names = list(outputs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    keys = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}

    def rouge(texts: Sequence[str]) -> list[dict[str, float]]:
        return [{keys[k]: 100 * s.fmeasure for k, s in scorer.score(r["reference"], t).items()}
                for r, t in zip(rows, texts, strict=True)]  # fmt: skip

    per = {name: rouge(outputs[name]) for name in names}

    def rouge_l(name: str, idx: Sequence[int]) -> float:
        return statistics.mean(per[name][i]["ROUGE-L"] for i in idx)

    print(f"summarize: FRANK {data}, {len(rows)} articles, metric ROUGE-L")
    folds, per_row, final = _templates(names, rouge_l, len(rows), args, "ROUGE-L")
    lead = rouge([lead3(r["article"]) for r in rows])
    figures, baselines = {}, {}
    for subset in [*sorted({r["dataset"] for r in rows}), "all"]:
        idx = [i for i, r in enumerate(rows) if subset in ("all", r["dataset"])]
        for key in keys.values():
            figures[f"{subset} {key}"] = statistics.mean(per[per_row[i]][i][key] for i in idx)
            baselines[f"{subset} {key}"] = statistics.mean(lead[i][key] for i in idx)
    held = [f.held_out_score for f in folds]
    print("cross-validated ROUGE-L: " + ", ".join(f"{k.split()[0]} {v:.1f} (lead-3 {baselines[k]:.1f})"
                                                  for k, v in figures.items() if k.endswith("-L"))
          + f"; {_spread(held)}; chosen on all rows: {final}")  # fmt: skip
    return Report("summarize", len(rows), figures, baselines, held, final)


def run(model_name: str, tasks: Sequence[str], data: dict[str, Path], args: argparse.Namespace) -> list[Report]:
    """Load the model once and choose each task's prompts (from cached outputs where --cache has them)."""
    from app.models.loading.loader import load_model

    settings = Settings(model=model_name)
    started = time.perf_counter()
    model = load_model(settings)
    print(f"{model_name} ({model.info.numerics}), {family_of(model.tokenizer)} prompts", flush=True)
    engine = trials.engine_for(model, settings, prefix_cache_mb=6144)
    engine.start()
    try:
        reports = []
        for task in tasks:
            path = None
            if args.cache:
                (args.cache / model_name).mkdir(parents=True, exist_ok=True)
                path = args.cache / model_name / f"{task}.json"
            choose = {"sentiment": choose_sentiment, "translate": choose_translate}.get(task, choose_summarize)
            cache_for = partial(trials.Cache, path, model_name, model.info.numerics)
            reports.append(choose(engine, data[task], args, cache_for))
            print(f"  ({task}: {time.perf_counter() - started:.0f} s since the model began loading)", flush=True)
        return reports
    finally:
        engine.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--max-size", type=int, default=4, help="sentiment: most prompts in one ensemble")
    parser.add_argument("--seed", type=int, default=0, help="the folds' shuffle")
    parser.add_argument("--limit", type=int, help="first N rows only (translate: 200 by default)")
    parser.add_argument("--cache", type=Path, help="a folder to keep each task's scores and outputs in, and to read "
                        "them from when present (choosing again then needs no model)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["sentiment", "translate", "summarize"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    add_arguments(parser)
    args = parser.parse_args()
    run(args.model, [args.task], {args.task: args.data}, args)


if __name__ == "__main__":
    main()
