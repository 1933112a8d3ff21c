"""Running the app under uvicorn, with a graceful drain on SIGTERM.

SIGTERM (what `docker stop` and Kubernetes send): the server keeps listening but answers new requests
503 + Retry-After (see app/api/guards.py) and /ready 503, while the requests already inside run to
the end; once the engine is idle, or `grace` seconds have passed, it shuts down and exits 0. A
second SIGTERM, or Ctrl-C, stops at once as uvicorn does (Ctrl-C: exit status 130, the shell's for SIGINT,
without a traceback). If the engine loop dies, the server exits with status 1 instead of lingering.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("textgen")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float) -> None:
        super().__init__(config)
        self.fastapi_app = app
        self.grace = grace
        self.drain_deadline: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_deadline is None and not self.should_exit:
            # Not recorded as captured: uvicorn would re-raise it after shutdown, and the exit code
            # of a drained server is 0.
            self.drain_deadline = time.monotonic() + self.grace
            self.fastapi_app.state.draining = True
            log.info("SIGTERM: refusing new requests, letting in-flight ones finish (up to %.0fs)", self.grace)
            return
        super().handle_exit(sig, frame)

    def _idle(self) -> bool:
        engine = getattr(self.fastapi_app.state, "engine", None)
        return engine is None or (not engine.scheduler.running and not engine.scheduler.queued)

    async def on_tick(self, counter: int) -> bool:
        engine = getattr(self.fastapi_app.state, "engine", None)
        if engine is not None and engine.fatal is not None and not self.should_exit:
            # A server whose engine is gone would accept requests and never answer: stop, non-zero,
            # so that the supervisor (compose's restart policy, Kubernetes) starts a fresh one.
            log.error("the engine loop died (%r); exiting with status 1", engine.fatal)
            self.exit_code = 1
            self.should_exit = True
        if self.drain_deadline is not None and not self.should_exit:
            if self._idle():
                log.info("drained: every in-flight request finished")
                self.should_exit = True
            elif time.monotonic() > self.drain_deadline:
                log.warning("drain deadline passed with requests still running; stopping")
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app: FastAPI, host: str, port: int, log_level: str, grace: float) -> int:
    """Run until stopped; the process's exit status: 0 after a drain, 1 if the engine died."""
    # uvicorn's own graceful wait covers responses still being written once the engine is idle.
    # keep-alive longer than the usual balancer/client idle timeouts (60 s): the side that closes an
    # idle connection first races the other side reusing it, and a POST lost that way is not retried.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                            timeout_keep_alive=75,
                            access_log=False)  # one structured line per request comes from app/api/access.py
    server = DrainingServer(config, app, grace)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises a Ctrl-C once it has shut down: stopped as asked, no traceback
        return 128 + signal.SIGINT
    return server.exit_code
