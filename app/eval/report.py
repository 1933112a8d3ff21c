"""`textgen eval report`: per model, each task's prompts chosen by cross-validation on the dev files, in-process,
then one table of the cross-validated figures with their baselines."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.eval import choose
from app.models.loading.store import StoreError

REPORT_DATA = {"sentiment": "sst2/dev.tsv", "translate": "translation/ntrex_dev.tsv",
               "summarize": "summarization/frank_validation.jsonl"}  # fmt: skip


def run_report(args: argparse.Namespace) -> int:
    """Per model, in-process: each task's prompts chosen by cross-validation on the dev files (app/eval/choose.py),
    then one table of the cross-validated figures with their baselines."""
    root = args.data or Path("../shared/data")
    data = {task: root / rel for task, rel in REPORT_DATA.items()}
    missing = [str(p) for p in data.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"--data: {root} lacks {', '.join(missing)} (the folder of ../shared/data/README.md)")
    tasks = [t for t in args.tasks.split(",") if t]
    for task in tasks:
        if task not in REPORT_DATA:
            raise SystemExit(f"--tasks: unknown task {task!r} (known: {', '.join(REPORT_DATA)})")
    table: dict[str, dict[str, choose.Report]] = {}
    for model in args.models.split(","):
        print(f"== {model}", flush=True)
        try:
            table[model] = {r.task: r for r in choose.run(model, tasks, data, args)}
        except StoreError as exc:
            raise SystemExit(f"textgen eval report: {exc}") from None
    print(f"\nCross-validated on the dev files ({args.folds} folds; each row scored by the prompt chosen without it); "
          "baselines in brackets")  # fmt: skip
    print(f"{'model':24} {'task':10} figures")
    for model, reports in table.items():
        for task, r in reports.items():
            spread = f"  [folds {min(r.folds):.1f}-{max(r.folds):.1f}]" if r.folds else ""
            if task == "sentiment":
                cells = f"SST-2 accuracy {r.figures['accuracy']:.1f}%"
            elif task == "translate":
                cells = "  ".join(f"en->{t} BLEU {r.figures[f'en-{t} BLEU']:.1f} ({r.baselines[f'en-{t} BLEU']:.1f}) "
                                  f"chrF {r.figures[f'en-{t} chrF']:.1f} ({r.baselines[f'en-{t} chrF']:.1f})"
                                  for t in choose.TARGETS)  # fmt: skip
            else:
                cells = "  ".join(f"{subset} R1/R2/RL " + "/".join(f"{r.figures[f'{subset} ROUGE-{k}']:.1f}"
                                                                  for k in "12L")
                                  + " (" + "/".join(f"{r.baselines[f'{subset} ROUGE-{k}']:.1f}" for k in "12L") + ")"
                                  for subset in dict.fromkeys(k.split()[0] for k in r.figures))  # fmt: skip
            print(f"{model:24} {task:10} {cells}{spread}  chosen: {r.chosen}")
    return 0
