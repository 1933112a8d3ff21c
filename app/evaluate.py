"""`textgen eval TASK --data PATH`: measure a running server's task endpoints on public data over HTTP.

Prints tables; asserts nothing. Data: ../shared/data (see its README).
"""

from __future__ import annotations

import argparse
import csv
import time
from collections import Counter
from pathlib import Path

import httpx


def _post(client: httpx.Client, path: str, body: dict) -> dict:
    tries = 20
    for _ in range(tries):
        r = client.post(path, json=body)
        if r.status_code == 429:  # the server is busy: wait as told
            time.sleep(float(r.headers.get("retry-after", "1")))
            continue
        r.raise_for_status()
        return dict(r.json())
    raise RuntimeError(f"{path}: still overloaded after {tries} tries")


def eval_sentiment(client: httpx.Client, data: Path, limit: int | None, batch: int) -> None:
    with data.open(newline="") as fh:
        rows = [(r["sentence"], int(r["label"])) for r in csv.DictReader(fh, delimiter="\t")]
    rows = rows[:limit] if limit else rows
    labels = ["negative", "positive"]
    predictions: dict[str, list[int]] = {"calibrated": [], "uncalibrated": []}
    started = time.perf_counter()
    model = ""
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        answer = _post(client, "/sentiment", {"texts": [t for t, _ in chunk], "labels": labels})
        model = answer["model"]
        for result in answer["results"]:
            predictions["calibrated"].append(labels.index(result["label"]))
            raw = result["uncalibrated"]
            predictions["uncalibrated"].append(int(raw["positive"] > raw["negative"]))
    elapsed = time.perf_counter() - started
    gold = [y for _, y in rows]
    print(f"SST-2 ({data}, {len(rows)} sentences), model {model}, {elapsed:.1f}s ({len(rows) / elapsed:.1f} texts/s)")
    print(f"{'scoring':14} {'accuracy':>8}   confusion (gold -> predicted)")
    for name, preds in predictions.items():
        acc = sum(p == y for p, y in zip(preds, gold, strict=True)) / len(gold)
        conf = Counter(zip(gold, preds, strict=True))
        cells = "  ".join(f"{labels[g][:3]}->{labels[p][:3]}: {conf[(g, p)]}" for g in (0, 1) for p in (0, 1))
        print(f"{name:14} {acc:8.1%}   {cells}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=["sentiment"])
    parser.add_argument("--data", type=Path, required=True, help="e.g. ../shared/data/sst2/dev.tsv")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--limit", type=int, help="first N examples only")
    parser.add_argument("--batch", type=int, default=32, help="texts per HTTP call")


def run_eval(args: argparse.Namespace) -> int:
    with httpx.Client(base_url=args.url, timeout=3600) as client:
        if args.task == "sentiment":
            eval_sentiment(client, args.data, args.limit, args.batch)
    return 0
