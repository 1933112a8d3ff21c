"""What the engine reports as it runs, for metrics. The engine calls these on its own thread."""

from __future__ import annotations

from typing import Protocol


class EngineObserver(Protocol):
    def step(self, batch_size: int, seconds: float) -> None:
        """One engine step: rows decoded (0 for a prefill-only step) and its wall time."""

    def first_token(self, seconds: float) -> None:
        """A sequence's first token, `seconds` after its request arrived."""

    def next_token(self, seconds: float) -> None:
        """A sequence's next token, `seconds` after its previous one."""

    def finished(self, prompt_tokens: int, completion_tokens: int, queue_seconds: float) -> None:
        """A request completed."""


class NullObserver:
    def step(self, batch_size: int, seconds: float) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def next_token(self, seconds: float) -> None:
        pass

    def finished(self, prompt_tokens: int, completion_tokens: int, queue_seconds: float) -> None:
        pass
