"""`textgen eval TASK --data PATH`: measure a running server's task endpoints on public data over HTTP.

Prints tables; asserts nothing. Data: ../shared/data (see its README).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import Counter
from pathlib import Path

import httpx

from app.eval.baselines import lead3


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
    predictions: dict[str, list[int]] = {"answer": [], "uncalibrated": []}
    started = time.perf_counter()
    model = ""
    calibrated = False
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        answer = _post(client, "/sentiment", {"texts": [t for t, _ in chunk], "labels": labels})
        model, calibrated = answer["model"], answer["calibrated"]
        for result in answer["results"]:
            predictions["answer"].append(labels.index(result["label"]))
            raw = result["uncalibrated"]
            predictions["uncalibrated"].append(int(raw["positive"] > raw["negative"]))
    # the server's answer is calibrated or not as its model family's default says (docs/tasks.md)
    predictions = {f"answer ({'calibrated' if calibrated else 'uncalibrated'})": predictions["answer"],
                   "uncalibrated": predictions["uncalibrated"]}  # fmt: skip
    elapsed = time.perf_counter() - started
    gold = [y for _, y in rows]
    numerics = client.get("/info").json().get("numerics")
    print(f"SST-2 ({data}, {len(rows)} sentences), model {model} ({numerics}), {elapsed:.1f}s "
          f"({len(rows) / elapsed:.1f} texts/s)")  # fmt: skip
    print(f"{'scoring':22} {'accuracy':>8}   confusion (gold -> predicted)")
    for name, preds in predictions.items():
        acc = sum(p == y for p, y in zip(preds, gold, strict=True)) / len(gold)
        conf = Counter(zip(gold, preds, strict=True))
        cells = "  ".join(f"{labels[g][:3]}->{labels[p][:3]}: {conf[(g, p)]}" for g in (0, 1) for p in (0, 1))
        print(f"{name:22} {acc:8.1%}   {cells}")


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def eval_translate(client: httpx.Client, data: Path, limit: int | None, batch: int) -> None:
    import sacrebleu

    with data.open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[: limit or 200]
    sources = [r["en"] for r in rows]
    print(f"NTREX ({data}, first {len(rows)} sentences), sacreBLEU {sacrebleu.__version__}")
    print(f"{'direction':10} {'BLEU':>6} {'chrF':>6}   {'copy-source BLEU':>16} {'chrF':>6}   {'s':>6}  model")
    for target in ("fr", "de"):
        refs = [r[target] for r in rows]
        started = time.perf_counter()
        hyps: list[str] = []
        model = ""
        for chunk in _batches(sources, batch):
            answer = _post(client, "/translate", {"texts": chunk, "source_lang": "en", "target_lang": target})
            hyps += answer["translations"]
            model = answer["model"]
        bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
        chrf = sacrebleu.corpus_chrf(hyps, [refs]).score
        copy_bleu = sacrebleu.corpus_bleu(sources, [refs]).score
        copy_chrf = sacrebleu.corpus_chrf(sources, [refs]).score
        print(f"en->{target:6} {bleu:6.1f} {chrf:6.1f}   {copy_bleu:16.1f} {copy_chrf:6.1f}   "
              f"{time.perf_counter() - started:6.0f}  {model}")  # fmt: skip


def eval_summarize(client: httpx.Client, data: Path, limit: int | None, batch: int) -> None:
    from rouge_score import rouge_scorer

    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    started = time.perf_counter()
    summaries: list[str] = []
    truncated = 0
    model = ""
    for chunk in _batches(rows, batch):
        answer = _post(client, "/summarize", {"texts": [r["article"] for r in chunk]})
        summaries += answer["summaries"]
        truncated += sum(answer["truncated"])
        model = answer["model"]
    elapsed = time.perf_counter() - started
    print(f"FRANK validation ({data}, {len(rows)} articles), model {model}, {elapsed:.0f}s, {truncated} truncated")
    print(f"{'set':8} {'n':>4}  {'system':8} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8}")
    for name in [*sorted({r["dataset"] for r in rows}), "all"]:
        idx = [i for i, r in enumerate(rows) if name in ("all", r["dataset"])]
        for system, texts in (("model", summaries), ("lead-3", [lead3(r["article"]) for r in rows])):
            scores = [scorer.score(rows[i]["reference"], texts[i]) for i in idx]
            f = {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}
            print(f"{name:8} {len(idx):4}  {system:8} {f['rouge1']:8.1f} {f['rouge2']:8.1f} {f['rougeL']:8.1f}")


def eval_perplexity(client: httpx.Client, data: Path, limit: int | None, window: int, reference: bool) -> None:
    from app.eval import perplexity  # torch only for this task

    info = client.get("/info").json()
    text = data.read_text()
    started = time.perf_counter()
    ids = perplexity.tokenize(client, text)
    chunks = perplexity.windows(ids, min(window, info["context_length"]))[:limit]
    api = perplexity.via_api(client, chunks)
    elapsed = time.perf_counter() - started
    print(f"WikiText-style perplexity of {info['model']} ({info.get('numerics')}) on {data}: {len(ids)} tokens, "
          f"{len(chunks)} windows of {window}, {api.tokens} predicted")  # fmt: skip
    print(f"{'computed by':26} {'perplexity':>10} {'seconds':>8}")
    print(f"{'server /v1/completions':26} {api.value:10.4f} {elapsed:8.1f}")
    if reference:
        from app.config import Settings
        from app.models.loading.loader import load_model

        started = time.perf_counter()
        loaded = load_model(Settings(model=info["model"], pack_weights=False))
        ref = perplexity.direct(loaded.model, chunks)
        print(f"{'transformers (direct)':26} {ref.value:10.4f} {time.perf_counter() - started:8.1f}")
        print(f"relative difference: {abs(api.value - ref.value) / ref.value:.2e}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=["sentiment", "translate", "summarize", "perplexity", "report"],
                        help="report: every task, prompts cross-validated in-process, one table per --models")
    parser.add_argument("--data", type=Path,
                        help="e.g. ../shared/data/sst2/dev.tsv; report: the data folder (default ../shared/data)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server to measure (without --modes)")
    parser.add_argument("--modes", default="",
                        help="start a server per numeric mode instead, one after the other, e.g. fp32,bf16,int8,int4 "
                        "(on --port, with --model)")  # fmt: skip
    parser.add_argument("--model", help="with --modes: the model (default: the server's default)")
    parser.add_argument("--port", type=int, default=8011, help="with --modes: port of the servers started")
    parser.add_argument("--limit", type=int,
                        help="first N examples only (translate: 200 by default; report: 100 NTREX sentences)")
    parser.add_argument("--batch", type=int, default=32, help="texts per HTTP call")
    parser.add_argument("--window", type=int, default=1024, help="perplexity: tokens per window (no overlap)")
    parser.add_argument("--models", default="smollm2-135m-instruct,gemma-3-270m", help="report: the models")
    parser.add_argument("--tasks", default="sentiment,translate,summarize", help="report: the tasks")
    parser.add_argument("--folds", type=int, default=5, help="report: cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="report: the folds' shuffle")
    parser.add_argument("--max-size", type=int, default=4, help="report: most sentiment prompts in one ensemble")
    parser.add_argument("--cache", type=Path, help="report: keep each model's scores and outputs here, and reuse "
                        "them when present (choosing again then needs no generation)")  # fmt: skip
    parser.add_argument("--reference", action="store_true",
                        help="perplexity: also compute it directly with transformers on the same windows")  # fmt: skip


def run_eval(args: argparse.Namespace) -> int:
    if args.task == "report":
        from app.eval.report import run_report

        return run_report(args)
    if args.data is None:
        raise SystemExit(f"textgen eval {args.task}: --data is required")
    if not args.modes:
        return _run_task(args, args.url)
    from app.bench.runner import MODES, engine_command, mode_env, serving

    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r} (known: {', '.join(MODES)})")
    url = f"http://127.0.0.1:{args.port}"
    for mode in args.modes.split(","):
        print(f"== mode {mode}", flush=True)
        with serving(engine_command(args.model, args.port), mode_env(mode), url):
            _run_task(args, url)
    return 0


def _run_task(args: argparse.Namespace, url: str) -> int:
    with httpx.Client(base_url=url, timeout=3600) as client:
        if args.task == "sentiment":
            eval_sentiment(client, args.data, args.limit, args.batch)
        elif args.task == "translate":
            eval_translate(client, args.data, args.limit, min(args.batch, 64))
        elif args.task == "perplexity":
            eval_perplexity(client, args.data, args.limit, args.window, args.reference)
        else:
            eval_summarize(client, args.data, args.limit, min(args.batch, 16))
    return 0
