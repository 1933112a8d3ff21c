"""Choose /sentiment's prompts by k-fold cross-validation on a dev file, in-process (no HTTP).

    python -m app.tasks.choose --model smollm2-135m-instruct --data ../shared/data/sst2/dev.tsv --folds 5

Scores every candidate prompt of app/tasks/sentiment.py on every sentence once through the engine (and the
content-free inputs the calibration divides by), then cross-validates every ensemble of up to --max-size
prompts, calibrated or not (app/tasks/crossval.py). Prints each fold's choice and its held-out accuracy,
their mean and spread, and the configuration chosen on all rows: what sentiment.ENSEMBLE should hold.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import statistics
import time
from pathlib import Path

from app.config import Settings
from app.engine.engine import Engine
from app.engine.limits import EngineLimits
from app.engine.types import RequestFailed, ScoreRequest, Scores
from app.models.loader import LoadedModel, load_model
from app.tasks import crossval, sentiment
from app.tasks.family import family_of

LABELS = ("negative", "positive")


async def _score_all(engine: Engine, requests: list[ScoreRequest], at_once: int = 64) -> list[list[float]]:
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


def score(model: LoadedModel, texts: list[str], gold: list[int]) -> crossval.Scored:
    family = family_of(model.tokenizer)
    engine = Engine(model.model, model.tokenizer, EngineLimits(max_queued_requests=4096),
                    context_length=model.info.context_length, eos_token_ids=model.info.eos_token_ids,
                    threads=model.info.threads)  # fmt: skip
    engine.start()
    try:
        per_text = [sentiment.candidates(model.tokenizer, family, t, LABELS) for t in texts]
        names = tuple(p.name for p in per_text[0])
        free = [sentiment.candidates(model.tokenizer, family, t, LABELS) for t in sentiment.CONTENT_FREE]
        flat = [p for prompts in per_text + free for p in prompts]
        results = asyncio.run(_score_all(engine, [ScoreRequest(p.ids, p.continuations) for p in flat]))
    finally:
        engine.stop()
    n = len(names)
    logprobs = [dict(zip(names, results[i * n : (i + 1) * n], strict=True)) for i in range(len(texts))]
    tail = results[len(texts) * n :]
    priors = {name: sentiment.mean_distribution([sentiment.softmax(tail[j * n + k]) for j in range(len(free))])
              for k, name in enumerate(names)}  # fmt: skip
    return crossval.Scored(names, logprobs, priors, gold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--max-size", type=int, default=4, help="most prompts in one ensemble")
    parser.add_argument("--seed", type=int, default=0, help="the folds' shuffle")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--scores", type=Path, help="keep the scores here, and read them from here when present "
                        "(choosing again with other settings then needs no model)")  # fmt: skip
    args = parser.parse_args()
    with args.data.open(newline="") as fh:
        rows = [(r["sentence"], int(r["label"])) for r in csv.DictReader(fh, delimiter="\t")]
    started = time.perf_counter()
    if args.scores and args.scores.is_file():
        kept = json.loads(args.scores.read_text())
        scored = crossval.Scored(tuple(kept["names"]), kept["logprobs"], kept["priors"], kept["gold"])
        numerics, family = kept["numerics"], kept["family"]
    else:
        model = load_model(Settings(model=args.model))
        scored = score(model, [t for t, _ in rows], [y for _, y in rows])
        numerics, family = model.info.numerics, family_of(model.tokenizer)
        if args.scores:
            args.scores.write_text(json.dumps({"names": scored.names, "logprobs": scored.logprobs, "priors":
                                               scored.priors, "gold": scored.gold, "numerics": numerics,
                                               "family": family}))  # fmt: skip
    print(f"{args.model} ({numerics}), {family} prompts, {len(rows)} sentences, "
          f"{len(scored.names)} candidate prompts scored in {time.perf_counter() - started:.0f} s")  # fmt: skip
    every = list(range(len(rows)))
    for name in scored.names:  # each prompt alone, on all rows (in-sample: for reading, not for choosing)
        print(f"  {name:22} calibrated {crossval.accuracy(scored, crossval.Config((name,), True), every):6.1%}  "
              f"uncalibrated {crossval.accuracy(scored, crossval.Config((name,), False), every):6.1%}")
    candidates = crossval.configs(scored.names, args.max_size)
    folds = crossval.cross_validate(scored, candidates, args.folds, args.seed)
    print(f"{args.folds}-fold cross-validation over {len(candidates)} configurations:")
    for f, fold in enumerate(folds):
        print(f"  fold {f}: held out {fold.held_out_accuracy:6.1%} ({fold.size} rows), chosen on the rest "
              f"({fold.train_accuracy:.1%}): {fold.chosen}")  # fmt: skip
    held = [fold.held_out_accuracy for fold in folds]
    print(f"cross-validated accuracy {statistics.mean(held):.1%} (folds {min(held):.1%}-{max(held):.1%}, "
          f"sd {statistics.stdev(held):.1%})")  # fmt: skip
    final = crossval.choose(scored, candidates, every)
    print(f"chosen on all rows: {final}")
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "numerics": numerics, "rows": len(rows), "folds": [
                {"chosen": str(f.chosen), "held_out": f.held_out_accuracy, "train": f.train_accuracy} for f in folds],
            "cross_validated": statistics.mean(held), "chosen": {"prompts": final.prompts,
                                                                 "calibrated": final.calibrated},
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
