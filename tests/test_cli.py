"""A bad setting stops `textgen serve` at once with one line naming its variable, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_zero_queued_requests_is_refused() -> None:
    # 0 used to be accepted, then refused every request (the start-up warm-up too): the server never started
    with pytest.raises(ValidationError, match="max_queued_requests"):
        Settings(max_queued_requests=0)
    assert Settings(max_queued_requests=1).max_queued_requests == 1


def test_serve_names_the_bad_variable() -> None:
    env = dict(os.environ, TEXTGEN_MAX_QUEUED_REQUESTS="0", TEXTGEN_MAX_NEW_TOKENS="lots")
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "textgen serve: TEXTGEN_MAX_QUEUED_REQUESTS=0: Input should be greater than or equal to 1" in done.stderr
    assert "TEXTGEN_MAX_NEW_TOKENS=lots" in done.stderr
    assert "Traceback" not in done.stderr
