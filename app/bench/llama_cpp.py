"""llama.cpp's `llama-server` as the peer in `textgen bench --compare --systems engine,llama.cpp`: its command line
and its `/completion` request and stream, so both servers get the same jobs (greedy, `ignore_eos`, streamed) from
the same client. Never a dependency: the bench runs it only when given `--llama-server PATH` (how to build it:
docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

NAME = "llama.cpp"
SLOT_TOKENS = 512  # context per parallel slot: the bench's prompts (<= 200 tokens) and answers (<= 128)


def command(server: Path, gguf: Path, port: int, parallel: int) -> list[str]:
    """`llama-server` on `gguf` with as many threads as CPUs and `parallel` slots (its continuous batching)."""
    return [str(server), "-m", str(gguf), "-t", str(os.cpu_count() or 1), "-np", str(parallel),
            "-c", str(parallel * SLOT_TOKENS), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip


def body(prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """The bench's job as llama.cpp's /completion takes it: greedy, every token generated, streamed."""
    return {"prompt": prompt, "n_predict": max_new_tokens, "ignore_eos": True, "stream": True, "temperature": 0.0,
            "top_k": 1}  # fmt: skip


def event(line: bytes) -> tuple[bool, int | None]:
    """One SSE line of /completion's stream -> (it carried text, the completion's token count on the last event)."""
    if not line.startswith(b"data: "):
        return False, None
    data = json.loads(line[6:])
    done = data.get("stop") is True
    count = data.get("tokens_predicted", data.get("timings", {}).get("predicted_n")) if done else None
    return bool(data.get("content")), None if count is None else int(count)
