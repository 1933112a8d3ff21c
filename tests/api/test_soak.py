"""`textgen soak` itself: a short storm against the tiny model ends with nothing lost and no 5xx."""

from __future__ import annotations

import re
import subprocess
import sys

from app.models.loading.loader import LoadedModel
from tests.conftest import live_server


def _outcomes(report: str) -> dict[str, int]:
    """The report's outcome table (from its 'outcome  requests' header to 'unexpected 5xx'): name -> count."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"outcome\s+requests$", line))
    table = {}
    for line in lines[start + 1 :]:
        name, count = re.fullmatch(r"(.+?)\s+(\d+)", line).groups()  # type: ignore[union-attr]
        table[name] = int(count)
        if name == "unexpected 5xx":
            return table
    raise AssertionError("no end to the outcome table")


def test_short_soak_loses_nothing(tiny: LoadedModel) -> None:
    with live_server(tiny, max_queued_requests=16, max_body_bytes=65536) as server:
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", "soak", "--url", server.url, "--duration", "8", "--clients", "12",
             "--warmup", "2", "--seed", "3", "--max-body", "65536", "--max-rss-growth", "1000"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        table = _outcomes(out)
        assert table["accepted but lost"] == 0 and table["unexpected 5xx"] == 0, out
        # the storm's oversized bodies were refused as such, and its bursts were told to come back
        assert table["completed"] > 0 and table.get("413", 0) > 0 and table.get("429 overloaded", 0) > 0, out
        assert "after the soak: /ready 200, running requests 0, rows 0, waiting 0, KV cache 0 bytes" in out
        assert server.engine.stats().running_rows == 0
