"""Settings: every knob comes from the environment (prefix TEXTGEN_) or the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_STORE = Path(__file__).resolve().parent.parent / "model_store"


class Settings(BaseSettings):
    # empty variables count as unset: compose files pass every setting, most of them empty
    model_config = SettingsConfigDict(env_prefix="TEXTGEN_", extra="ignore", env_ignore_empty=True)

    # Model
    model: str | None = Field(
        default=None,
        description="A built-in name, a hub id, a local .gguf file or a local Hugging Face folder. Unset: gpt2 if it "
        "is available locally, else smollm2-135m-instruct.",
    )
    model_store: Path = Field(default=DEFAULT_STORE, description="Folder holding pulled models.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="auto = bf16 (or fp16) on GPU; on CPU the fastest numeric mode the CPU has (see quantize). "
        "float32 on CPU: the exact reference path; bfloat16: bf16 weights (needs avx512_bf16 or AMX).",
    )
    quantize: Literal["auto", "none", "int8", "int4"] = Field(
        default="auto",
        description="CPU only. int4: 4-bit weights in groups of 32 (GGUF Q4's layout) times int8 activations per "
        "group of 32 on AVX512-VNNI or AVX2 + FMA (else PyTorch's kernel on bf16 activations; needs avx512_f or avx2). "
        "int8: 8-bit weights in groups of 32 times int8 activations per group of 32 on the same kernel (without it, "
        "oneDNN's int8 with per-row activations; needs avx512_vnni, avx_vnni or AMX). "
        "auto (with dtype auto): int4 for the layers whose weights are 4-bit already (a Q4 GGUF), the rest in the "
        "fastest other mode the CPU has (bf16, else int8, else fp32). none: neither int4 nor int8.",
    )
    cpu_features: str | None = Field(
        default=None,
        description="Comma-separated CPU features to assume instead of the detected ones (torch's names, e.g. "
        "'avx2,avx512_vnni'): to see and test what another CPU would run.",
    )
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads; unset = torch default.")
    verify_weights: bool = Field(default=True, description="Check the manifest's sha256 of the weights on load.")
    pull_missing: bool = Field(default=True, description="Pull the offline default model if it is missing.")
    pack_weights: bool = Field(
        default=True,
        description="On CPU: the fast numeric modes (prepacked fp32 / bf16 / int8 linears, see quantize) and the "
        "single-token decode attention kernel (app/models/layers/attention.py). False = the stock transformers model.",
    )

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # Engine limits
    max_batch_size: int = Field(default=32, ge=1, description="Rows decoded together in one step.")
    max_batch_tokens: int = Field(
        default=32768,
        ge=16,
        description="KV-cache budget in tokens: the sum over running rows of prompt + max new tokens. "
        "Allocated when the engine starts. Unset: 32768, or what 1 GiB of the model's KV cache holds where fewer.",
    )
    max_prefill_tokens: int = Field(
        default=2048, ge=16, description="Prompt tokens prefilled in one step, so decoding rows are not starved."
    )
    prefill_chunk_tokens: int = Field(
        default=512, ge=16,
        description="A longer prompt is prefilled this many tokens per step, between the other rows' decode steps.",
    )
    kv_cache_dtype: Literal["auto", "model", "bfloat16", "int8"] = Field(
        default="auto",
        description="What the KV cache stores, on CPU with the attention kernels: int8 (a scale per token and head: "
        "a quarter of fp32's bytes for a decode step to read), bfloat16 (half), or model (the model's own dtype). "
        "auto: int8 where the model's products run our group kernel (int4 / int8 modes; bf16 for models with "
        "sliding-window layers), bf16 in the bf16 mode, model in fp32 (token-exact against transformers).",
    )
    prefix_cache_mb: int = Field(
        default=256, ge=0, description="Memory for K/V of recent prompts, reused by prompts that start alike; 0 = off."
    )
    # at least 1: every request waits in the queue, however briefly, before it runs (0 refused every request,
    # the start-up warm-up included, so the server could not start)
    max_queued_requests: int = Field(default=256, ge=1, description="Waiting requests before 429 (at least 1).")
    max_queued_tokens: int = Field(
        default=262144, ge=1, description="Waiting work before 429: the sum of prompt + max new tokens, per row."
    )
    max_prompt_tokens: int | None = Field(default=None, ge=1, description="Unset: the model's context length.")
    max_new_tokens: int = Field(default=1024, ge=1, description="Cap on max_new_tokens per request.")
    default_max_new_tokens: int = Field(default=64, ge=1)
    max_return_sequences: int = Field(default=8, ge=1)
    max_batch_texts: int = Field(default=64, ge=1, description="Texts (or prompts) one call may send as a list.")
    request_timeout: float = Field(default=300.0, gt=0, description="Seconds from arrival to the last token.")

    # HTTP
    api_keys: Annotated[list[str], NoDecode] = Field(
        default=[], description="Comma-separated API keys; set, every model route needs one (Bearer or X-API-Key)."
    )
    api_keys_file: Path | None = Field(default=None, description="File with one API key a line (# comments).")
    open_paths: Annotated[list[str], NoDecode] = Field(
        default=["/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json", "/", "/static/"],
        description="Paths that need no API key, comma-separated; one ending in '/' opens all below it.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default=[], description="Origins allowed by CORS, comma-separated ('*' = any); empty = CORS off."
    )
    max_body_bytes: int = Field(default=2 * 2**20, ge=1024, description="Larger request bodies get 413.")
    shutdown_grace: float = Field(
        default=30.0, ge=0, description="On SIGTERM: seconds in-flight requests get to finish (new ones get 503)."
    )

    @field_validator("api_keys", "open_paths", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def all_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys
