"""What goes into the engine (a request) and what comes out (events). No torch, no FastAPI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from app.engine.errors import EngineError


@dataclass(frozen=True)
class SamplingParams:
    """Per-row decoding controls. `do_sample=False` (or temperature 0) is greedy, as in transformers."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


@dataclass(frozen=True)
class Constraint:
    """The output must match: a JSON Schema (`value`: the schema, a dict), any JSON object (`json_object`), a
    regular expression (`value`: the pattern, matched in full), or one of some strings (`value`: a list).
    `field`: the request field it came from, named in errors (the routes' names differ)."""

    kind: Literal["json_schema", "json_object", "regex", "choice"]
    value: Any = None
    field: str = "constraint"


@dataclass(frozen=True)
class GenerationRequest:
    """One client request: a prompt (text or token ids) and how to continue it.

    `max_length` is transformers' meaning (prompt + new tokens); when both are set, `max_new_tokens` wins.
    """

    prompt: str | list[int]
    max_new_tokens: int | None = None
    max_length: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    num_return_sequences: int = 1
    ignore_eos: bool = False
    request_id: str = ""
    timeout: float | None = None  # seconds; None or more than the server's limit = the server's limit
    # Log-probabilities (under the model's raw distribution) of each generated token, plus this many
    # most likely alternatives; None = none. `prompt_logprobs` does the same for the prompt's tokens;
    # with it, max_new_tokens=0 is allowed: the prompt is scored and nothing is generated.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None  # app/engine/constraints.py


@dataclass(frozen=True)
class ScoreRequest:
    """How likely is each continuation after the prompt? Prefill only, nothing is generated.

    Continuations are token ids or text; text is tokenized on its own (no special tokens) and appended
    to the prompt's ids, so the caller decides about a leading space.
    """

    prompt: str | list[int]
    continuations: tuple[str | tuple[int, ...], ...]
    request_id: str = ""
    timeout: float | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability, and the most likely tokens at its position (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# ---- events, in the order a request sees them --------------------------------------------------
@dataclass(frozen=True)
class PromptLogprobs:
    """Sent after the prefill of a request that asked for `prompt_logprobs`. The first prompt token
    has nothing before it to be predicted from: None."""

    tokens: tuple[TokenLogprob | None, ...]


@dataclass(frozen=True)
class TokenDelta:
    """New text of sequence `index`: may be empty while text is held back (a possible stop string).

    `logprobs` covers the tokens generated since the previous delta of this sequence (when asked for).
    """

    index: int
    text: str
    token_id: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class SequenceFinished:
    index: int
    finish_reason: str  # "length" | "stop" | "eos"
    text: str  # the whole generated text, stop string trimmed
    token_ids: tuple[int, ...]  # every generated token, the EOS or stop-making ones included
    seed: int | None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when asked for
    constraint_complete: bool | None = None  # constrained: the text is a full match; None: unconstrained


@dataclass(frozen=True)
class Scores:
    """The answer to a ScoreRequest: per continuation, the sum of its tokens' log-probabilities."""

    logprobs: tuple[float, ...]
    token_counts: tuple[int, ...]


@dataclass(frozen=True)
class RequestFinished:
    """Last event of a successful request."""

    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class RequestFailed:
    """Last event of a failed request."""

    error: EngineError


Event = PromptLogprobs | TokenDelta | SequenceFinished | Scores | RequestFinished | RequestFailed
