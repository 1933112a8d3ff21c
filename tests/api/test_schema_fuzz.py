"""`schemathesis run` against the served OpenAPI schema of a live server on the tiny model:
no 5xx for anything it generates, and every response matches the schema it documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import LiveServer


def test_schemathesis_finds_no_server_error_or_schema_violation(tiny_server: LiveServer, tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [str(cli), "run", f"{tiny_server.url}/openapi.json",
         "--checks", "not_a_server_error,response_schema_conformance",
         "--max-examples", "15", "--seed", "20261128", "--request-timeout", "60",
         "--generation-database", "none", "--no-color"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "generated" in result.stdout and "failed" not in result.stdout.split("SUMMARY")[-1]
