"""SIGTERM against a real `textgen serve` process: in-flight streams finish, new requests get 503, exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import STORE

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve() -> tuple[subprocess.Popen[str], str]:
    """A `textgen serve` process on the tiny model, ready; and its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, TEXTGEN_MODEL="tiny-gpt2", TEXTGEN_MODEL_STORE=str(STORE), TEXTGEN_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server did not come up")
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def test_ctrl_c_stops_without_a_traceback() -> None:
    proc, url = _serve()
    try:
        assert httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 2}).status_code == 200
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read() if proc.stdout else ""
    assert code == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output


def test_sigterm_drains_in_flight_streams_and_exits_zero() -> None:
    proc, url = _serve()
    try:

        streams: dict[int, list[dict]] = {}
        all_started = threading.Barrier(9)

        def stream(i: int) -> None:
            events: list[dict] = []
            body = {"prompt": "Hello", "max_new_tokens": 800, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        if len(events) == 1:
                            all_started.wait()
            streams[i] = events

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        all_started.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        refused = httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 2})
        ready = httpx.get(f"{url}/ready")
        still_running = sum(t.is_alive() for t in threads)
        for t in threads:
            t.join(120)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert refused.json()["error"]["type"] == "unavailable"
    assert ready.status_code == 503
    assert still_running == 8, "the streams should still have been running when SIGTERM came"
    assert sorted(streams) == list(range(8))
    for events in streams.values():
        assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 800
    assert code == 0
