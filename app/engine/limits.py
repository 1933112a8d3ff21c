"""What an engine is allowed (EngineLimits, from the server's settings) and what it reports (EngineStats)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = 32768
    max_prefill_tokens: int = 2048
    prefill_chunk_tokens: int = 512  # longer prompts are prefilled in pieces this size, one per step
    max_queued_requests: int = 256
    max_queued_tokens: int = 262144
    max_prompt_tokens: int | None = None
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 64
    max_return_sequences: int = 8
    request_timeout: float = 300.0
    prefix_cache_bytes: int = 256 * 2**20  # K/V of recent prompts kept for reuse; 0 turns it off
    kv_cache_dtype: str = "auto"  # what the KV cache stores: auto | model | bfloat16 | int8 (numerics.kv_cache_dtype)


@dataclass
class EngineStats:
    running_requests: int = 0
    running_rows: int = 0
    waiting: int = 0
    steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    completed_requests: int = 0
    failed_requests: int = 0
    kv_cache_bytes: int = 0  # spanned by the running batch
    kv_cache_capacity_bytes: int = 0  # the arena the batch lives in: the configured budget
    prefix_cache_bytes: int = 0
    prefix_cache_entries: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    decode_seconds: float = 0.0  # in the model's decode forward + sampling
    prefill_seconds: float = 0.0  # in the model's prefill forward + sampling
    busy_seconds: float = 0.0  # in steps, postprocessing included
    constraint_mask_seconds: float = 0.0  # computing and applying constrained rows' token masks
    constraint_mask_steps: int = 0  # decode steps (and first tokens) that had constrained rows
    batch_sizes: Counter[int] = field(default_factory=Counter)  # decode steps seen per batch size
    # CUDA only (0 on CPU, where host memory is /metrics' process_resident_memory_bytes): the caching
    # allocator's reserved bytes now, and the peak of allocated bytes since start
    device_memory_reserved_bytes: int = 0
    device_memory_peak_bytes: int = 0
    decode_attention: str = ""  # "ragged-c-kernel" (built for this CPU) or "torch" (no compiler, other dtypes)
    kv_cache_dtype: str = ""  # what the KV cache stores: float32, bfloat16, int8 (with a scale per token and head)
