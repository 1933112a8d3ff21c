"""`textgen soak` itself: a short storm against the tiny model ends with nothing lost and no 5xx."""

from __future__ import annotations

import re
import subprocess
import sys

from app.models.loader import LoadedModel
from tests.conftest import live_server


def test_short_soak_loses_nothing(tiny: LoadedModel) -> None:
    with live_server(tiny, max_queued_requests=16, max_body_bytes=65536) as server:
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", "soak", "--url", server.url, "--duration", "8", "--clients", "12",
             "--warmup", "2", "--seed", "3", "--max-body", "65536", "--max-rss-growth", "1000"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert re.search(r"accepted but lost\s+0\b", out) and re.search(r"unexpected 5xx\s+0\b", out)
        assert re.search(r"completed\s+\d+", out) and "413" in out and "429 overloaded" in out
        assert "after the soak: /ready 200, running requests 0, rows 0, waiting 0, KV cache 0 bytes" in out
        assert server.engine.stats().running_rows == 0
