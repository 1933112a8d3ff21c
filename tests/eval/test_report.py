"""`textgen eval report`, run as a user runs it: every task's prompts cross-validated on a dev folder, one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import STORE

ROOT = Path(__file__).resolve().parents[2]


def _data(root: Path) -> None:
    (root / "sst2").mkdir(parents=True)
    rows = ["sentence\tlabel", *(f"{'a fine film' if i % 2 else 'a dull film'} number {i}\t{i % 2}" for i in range(10))]
    (root / "sst2" / "dev.tsv").write_text("\n".join(rows) + "\n")
    (root / "translation").mkdir()
    pairs = [("Good morning.", "Bonjour.", "Guten Morgen."), ("It rains.", "Il pleut.", "Es regnet."),
             ("The shop is closed.", "Le magasin est fermé.", "Der Laden ist geschlossen."),
             ("Thank you.", "Merci.", "Danke.")]
    (root / "translation" / "ntrex_dev.tsv").write_text("en\tfr\tde\n" + "".join("\t".join(p) + "\n" for p in pairs))
    (root / "summarization").mkdir()
    articles = [{"id": str(i), "dataset": "cnndm" if i < 2 else "xsum", "article": f"The council met on day {i}. "
                 "It approved the bridge. Work starts in May.", "reference": "The council approved the bridge."}
                for i in range(4)]  # fmt: skip
    (root / "summarization" / "frank_validation.jsonl").write_text("".join(json.dumps(a) + "\n" for a in articles))


def test_report_prints_one_table_and_reuses_its_cache(tmp_path: Path) -> None:
    _data(tmp_path / "data")
    env = {**os.environ, "TEXTGEN_MODEL_STORE": str(STORE), "TEXTGEN_THREADS": "2"}
    base = [sys.executable, "-m", "app.cli", "eval", "report", "--folds", "2", "--cache", str(tmp_path / "cache")]
    command = [*base, "--models", "tiny-gpt2", "--data", str(tmp_path / "data")]
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    table = first.stdout.split("Cross-validated on the dev files", 1)[1]
    lines = {line.split()[1]: line for line in table.splitlines() if line.startswith("tiny-gpt2")}
    assert set(lines) == {"sentiment", "translate", "summarize"}
    assert "SST-2 accuracy" in lines["sentiment"] and "en->fr BLEU" in lines["translate"]
    assert "(" in lines["translate"] and "cnndm R1/R2/RL" in lines["summarize"] and "xsum" in lines["summarize"]
    kept = json.loads((tmp_path / "cache" / "tiny-gpt2" / "translate.json").read_text())
    assert set(kept["outputs"]) == {"everyday-3", "news-3", "everyday-news-6"}
    # again: the kept outputs give the same table (choosing needs no generation)
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.split("Cross-validated on the dev files", 1)[1] == table
    # a data folder without the files, a model that is not there: one line each, no traceback
    for wrong, says in ((["--models", "tiny-gpt2", "--data", str(tmp_path)], "lacks"),
                        (["--models", str(tmp_path / "nowhere"), "--data", str(tmp_path / "data")], "no such file")):
        failed = subprocess.run([*base, *wrong], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert failed.returncode != 0 and says in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
