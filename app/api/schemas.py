"""HTTP request and response bodies. Unknown fields are refused (422), so typos never pass silently."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine.limits import EngineLimits, EngineStats
from app.engine.types import Constraint, RequestFinished


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(StrictModel):
    """Decoding controls shared by /generate and the task endpoints."""

    max_new_tokens: int | None = Field(default=None, ge=1, description="New tokens at most.")
    temperature: float | None = Field(default=None, ge=0, description="0 = greedy. Setting it turns on sampling.")
    top_k: int | None = Field(default=None, ge=0, description="Keep the k most likely tokens; 0 = off.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass; 1 = off.")
    repetition_penalty: float | None = Field(default=None, gt=0, description="1 = off; > 1 discourages repeats.")
    do_sample: bool | None = Field(
        default=None,
        description="Sample instead of greedy decoding. Unset: sampling when temperature, top_k or top_p is given.",
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Seed for reproducible sampling.")


class JsonSchemaConstraint(StrictModel):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema", description="The JSON Schema the output must validate against.")

    def engine(self) -> Constraint:
        return Constraint("json_schema", self.json_schema, field="constraint.schema")


class JsonObjectConstraint(StrictModel):
    type: Literal["json_object"]

    def engine(self) -> Constraint:
        return Constraint("json_object", field="constraint")


class RegexConstraint(StrictModel):
    type: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=4096, description="Matched in full by the output.")

    def engine(self) -> Constraint:
        return Constraint("regex", self.pattern, field="constraint.pattern")


class ChoiceConstraint(StrictModel):
    type: Literal["choice"]
    choices: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=1024,
                                                               description="The output is exactly one of these.")

    def engine(self) -> Constraint:
        return Constraint("choice", list(self.choices), field="constraint.choices")


ConstraintField = Annotated[JsonSchemaConstraint | JsonObjectConstraint | RegexConstraint | ChoiceConstraint,
                            Field(discriminator="type")]  # fmt: skip


class GenerateRequest(SamplingFields):
    prompt: str = Field(min_length=1, description="Text to continue.")
    max_length: int | None = Field(
        default=None, ge=1, description="Prompt + new tokens (transformers' meaning); max_new_tokens wins."
    )
    stop: list[str] | str | None = Field(default=None, description="Stop strings, trimmed from the output.")
    num_return_sequences: int = Field(default=1, ge=1, description="Sequences to return (needs sampling when > 1).")
    return_full_text: bool = Field(default=False, description="Prepend the prompt to each generated text.")
    ignore_eos: bool = Field(default=False, description="Keep generating past the end-of-sequence token.")
    stream: bool = Field(default=False, description="Server-Sent Events: one event per text delta, then a final one.")
    constraint: ConstraintField | None = Field(
        default=None, description='The output must match: {"type": "json_schema", "schema": {...}}, {"type": '
        '"json_object"}, {"type": "regex", "pattern": "..."} or {"type": "choice", "choices": [...]}.')

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: list[str] | str | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > 256 for s in stops):
            raise ValueError("stop strings must be at most 256 characters")
        return stops


class Usage(BaseModel):
    """Tokens a call used: the one usage model of every route (/generate, the tasks, the OpenAI API)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, finished: Iterable[RequestFinished | None]) -> Usage:
        """The sum over the engine requests a call made (None: one that did not finish)."""
        done = [f for f in finished if f is not None]
        prompt = sum(f.prompt_tokens for f in done)
        completion = sum(f.completion_tokens for f in done)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class Generation(BaseModel):
    index: int
    text: str
    finish_reason: Literal["length", "stop", "eos"]
    completion_tokens: int
    seed: int | None = Field(default=None, description="The seed this sequence was sampled with (None: greedy).")
    constraint_complete: bool | None = Field(
        default=None, description="With a constraint: whether the text is a complete match (false: it was cut "
        "short, by max_new_tokens or a stop string, and may not parse). Without one: null.")


class GenerateResponse(BaseModel):
    id: str
    model: str
    generations: list[Generation]
    usage: Usage
    queue_seconds: float
    total_seconds: float


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class InfoResponse(BaseModel):
    version: str
    model: str
    source: str
    architecture: str
    parameters: int
    device: str
    dtype: str
    numerics: str = Field(description="What runs the model's matrix products, e.g. int4-w4a8-g32+bf16, "
                          "bf16-packed, fp32-packed (CPU), cuda-bfloat16.")  # fmt: skip
    context_length: int
    vocab_size: int
    has_chat_template: bool
    limits: EngineLimits  # the engine's own limits, one source of truth (app/startup.py: engine_limits)
    engine: EngineStats  # what the engine reports about itself (app/engine/limits.py)


def _texts(text: str | None, texts: list[str] | None, limit: int) -> list[str]:
    if (text is None) == (texts is None):
        raise ValueError("give exactly one of 'text' and 'texts'")
    items = [text] if text is not None else list(texts or [])
    if not items:
        raise ValueError("'texts' must not be empty")
    if len(items) > limit:
        raise ValueError(f"at most {limit} texts per call (got {len(items)})")
    if any(not t.strip() for t in items):
        raise ValueError("texts must not be empty")
    return items


class SentimentRequest(StrictModel):
    text: str | None = Field(default=None, description="One text to classify.")
    texts: list[str] | None = Field(
        default=None, description="Several texts (up to the server's max_batch_texts, default 64), scored as a batch."
    )
    labels: list[str] = Field(default=["negative", "positive"], min_length=2, max_length=20,
                              description="Candidate labels (each may be several tokens).")  # fmt: skip
    calibrate: bool | None = Field(default=None, description="Contextual calibration against content-free inputs. "
                                   "Unset: what cross-validation chose for the model's family (docs/tasks.md).")

    def items(self, limit: int) -> list[str]:
        return _texts(self.text, self.texts, limit)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        if any(not label.strip() for label in value):
            raise ValueError("labels must not be empty")
        if len(set(value)) != len(value):
            raise ValueError("labels must be distinct")
        return value


class SentimentResult(BaseModel):
    label: str
    score: float = Field(description="Probability of the chosen label.")
    scores: dict[str, float] = Field(description="Probability of every label (calibrated when asked), sums to 1.")
    uncalibrated: dict[str, float] = Field(description="Label probabilities before calibration.")
    logprobs: dict[str, list[float]] = Field(
        description="Per prompt (see `prompts`): sum of the label tokens' log-probabilities after it."
    )


class SentimentResponse(BaseModel):
    model: str
    results: list[SentimentResult]
    calibrated: bool
    prompts: list[str] = Field(description="The prompts whose label distributions were averaged.")
    usage: Usage


class TranslateRequest(SamplingFields):
    text: str | None = Field(default=None, description="One text to translate.")
    texts: list[str] | None = Field(
        default=None, description="Several texts (up to max_batch_texts), translated as a batch."
    )
    source_lang: str = Field(default="en", description="ISO 639-1 code or English name of the source language.")
    target_lang: str = Field(description="ISO 639-1 code or English name of the target language.")

    def items(self, limit: int) -> list[str]:
        return _texts(self.text, self.texts, limit)


class TranslateResponse(BaseModel):
    model: str
    source_lang: str
    target_lang: str
    translations: list[str]
    finish_reasons: list[Literal["length", "stop", "eos"]]
    usage: Usage


class SummarizeRequest(SamplingFields):
    text: str | None = Field(default=None, description="One article to summarize.")
    texts: list[str] | None = Field(
        default=None, description="Several articles (up to max_batch_texts), summarized as a batch."
    )

    def items(self, limit: int) -> list[str]:
        return _texts(self.text, self.texts, limit)


class SummarizeResponse(BaseModel):
    model: str
    summaries: list[str]
    finish_reasons: list[Literal["length", "stop", "eos"]]
    truncated: list[bool] = Field(description="True where the article was cut (its lead kept) to fit the context.")
    usage: Usage
