"""The input stage: a request's validation and tokenization, on a thread of its own, into a RequestState.

Off the event loop: tokenizing a 1 MiB prompt takes the tokenizer ~1-3 s, and on the loop every open stream
would stall meanwhile. One thread, so requests are prepared in the order they came. Errors are
InvalidRequest naming the field and the bound; the routes map them to 422.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import torch

from app.engine.constraints import Grammars
from app.engine.detokenize import IncrementalText
from app.engine.errors import EngineStopped, InvalidRequest
from app.engine.kv_cache import BLOCK, blocks_for
from app.engine.limits import MAX_TOP_LOGPROBS, EngineLimits
from app.engine.state import Channel, RequestState, SequenceState
from app.engine.stopping import StreamText
from app.engine.types import GenerationRequest, ScoreRequest

T = TypeVar("T")


class Input:
    def __init__(self, tokenizer: Any, limits: EngineLimits, *, context_length: int, vocab_size: int,
                 device: torch.device, grammars: Grammars) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.limits = limits
        self.context_length = context_length
        self.max_prompt_tokens = min(limits.max_prompt_tokens or context_length, context_length)
        self.vocab_size = vocab_size
        self.device = device  # where sampled rows' generators live
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textgen-input")

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` on the input thread: requests, and the tokenizing work of routes (prompt templates)."""
        try:
            done = asyncio.get_running_loop().run_in_executor(self._thread, work, *args)
        except RuntimeError:  # the thread is shut down: the engine stopped
            raise EngineStopped("the engine is not running") from None
        return await done

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False)  # what it is tokenizing now finds the engine stopped

    def prepare(self, request: GenerationRequest | ScoreRequest, loop: asyncio.AbstractEventLoop) -> RequestState:
        prompt_ids = self._prompt_ids(request)
        if isinstance(request, ScoreRequest):
            max_new = 0
            state = self._new_state(request, prompt_ids, 0, self._continuations(request, prompt_ids), loop)
        else:
            max_new = self._max_new_tokens(request, len(prompt_ids))
            self._check_sampling(request)
            state = self._new_state(request, prompt_ids, max_new, [], loop)
        held = blocks_for(state.reserved_tokens) * BLOCK  # a segment holds whole blocks of the KV cache
        if state.kv_rows * held > self.limits.max_batch_tokens:
            blocks = "" if held == state.reserved_tokens else f" ({state.kv_rows * held} in whole KV blocks of {BLOCK})"
            what = "prompt + its longest continuation" if state.scoring else (
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}), times {state.rows} sequences,")
            raise InvalidRequest(
                f"{what} is {state.kv_rows * state.reserved_tokens} tokens{blocks}; this server's "
                f"max_batch_tokens is {self.limits.max_batch_tokens}",
                field="prompt" if state.scoring else "max_new_tokens",
            )
        grammar = None
        if isinstance(request, GenerationRequest) and request.constraint is not None:
            grammar = self.grammars.grammar(request.constraint)  # compiled once per distinct constraint
        state.sequences = [self._new_sequence(state, i) for i in range(state.rows)]
        if grammar is not None:
            for seq in state.sequences:
                seq.guide = self.grammars.guide(grammar)
        return state

    def _new_state(self, request: GenerationRequest | ScoreRequest, prompt_ids: list[int], max_new: int,
                   continuations: list[list[int]], loop: asyncio.AbstractEventLoop) -> RequestState:  # fmt: skip
        now = time.monotonic()
        return RequestState(
            id=request.request_id or uuid.uuid4().hex,
            request=request,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            channel=Channel(loop),
            arrival=now,
            deadline=now + self.timeout(request),
            continuations=continuations,
        )

    def _continuations(self, request: ScoreRequest, prompt_ids: list[int]) -> list[list[int]]:
        if not request.continuations:
            raise InvalidRequest("at least one continuation (label) is needed", field="continuations")
        out = []
        for c in request.continuations:
            ids = list(c) if not isinstance(c, str) else list(self.tokenizer.encode(c, add_special_tokens=False))
            if not ids:
                raise InvalidRequest(f"continuation {c!r} has no tokens", field="continuations")
            out.append(ids)
        longest = len(prompt_ids) + max(len(c) for c in out)
        if longest > self.context_length:
            raise InvalidRequest(
                f"prompt + continuation is {longest} tokens; the model's context length is {self.context_length}",
                field="prompt",
            )
        return out

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def _prompt_ids(self, request: GenerationRequest | ScoreRequest) -> list[int]:
        if isinstance(request.prompt, str):
            if not request.prompt:
                raise InvalidRequest("prompt must not be empty", field="prompt")
            ids = self.tokenize(request.prompt)
        else:
            ids = list(request.prompt)
            vocab = self.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})", field="prompt")
        if not ids:
            raise InvalidRequest("prompt must contain at least one token", field="prompt")
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens} "
                f"(model context length {self.context_length})",
                field="prompt",
            )
        return ids

    def _max_new_tokens(self, request: GenerationRequest, prompt_len: int) -> int:
        cap = self.limits.max_new_tokens
        room = self.context_length - prompt_len
        if request.max_new_tokens == 0 and request.prompt_logprobs is not None:
            return 0  # score the prompt only
        if request.max_new_tokens is not None:
            field, wanted = "max_new_tokens", request.max_new_tokens
            if wanted < 1:
                raise InvalidRequest("max_new_tokens must be >= 1", field=field)
            if wanted > cap:
                raise InvalidRequest(f"max_new_tokens must be <= {cap} (got {wanted})", field=field)
        elif request.max_length is not None:
            field, wanted = "max_length", request.max_length - prompt_len
            if wanted < 1:
                raise InvalidRequest(
                    f"max_length ({request.max_length}) must be greater than the prompt's length "
                    f"({prompt_len} tokens); max_length counts prompt + new tokens",
                    field=field,
                )
            if wanted > cap:
                raise InvalidRequest(
                    f"max_length ({request.max_length}) allows {wanted} new tokens; the cap is {cap}", field=field
                )
        else:
            # No limit asked for: the default, shortened to what the context still holds.
            return max(1, min(self.limits.default_max_new_tokens, cap, room))
        if wanted > room:
            raise InvalidRequest(
                f"prompt ({prompt_len} tokens) + {wanted} new tokens = {prompt_len + wanted} exceeds the "
                f"model's context length of {self.context_length} tokens",
                field=field,
            )
        return wanted

    def _check_sampling(self, request: GenerationRequest) -> None:
        p = request.sampling
        n = request.num_return_sequences
        checks = [
            (p.temperature >= 0, "temperature", "temperature must be >= 0"),
            (0 < p.top_p <= 1, "top_p", "top_p must be in (0, 1]"),
            (p.top_k >= 0, "top_k", "top_k must be >= 0"),
            (p.repetition_penalty > 0, "repetition_penalty", "repetition_penalty must be > 0"),
            (1 <= n <= self.limits.max_return_sequences, "num_return_sequences",
             f"num_return_sequences must be between 1 and {self.limits.max_return_sequences}"),
            (request.logprobs is None or 0 <= request.logprobs <= MAX_TOP_LOGPROBS, "logprobs",
             f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            (request.prompt_logprobs is None or 0 <= request.prompt_logprobs <= MAX_TOP_LOGPROBS, "prompt_logprobs",
             f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            (n == 1 or not p.greedy, "num_return_sequences",
             "num_return_sequences > 1 needs sampling (do_sample=true and temperature > 0): greedy "
             "decoding would return the same text n times"),
        ]  # fmt: skip
        for ok, name, message in checks:
            if not ok:
                raise InvalidRequest(message, field=name)

    def _new_sequence(self, state: RequestState, index: int) -> SequenceState:
        request = state.request
        assert isinstance(request, GenerationRequest)
        params = request.sampling
        generator = None
        if not params.greedy:
            # Every sampled row gets its own generator: its draws never depend on its batch-mates.
            seed = params.seed + index if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            params = replace(params, seed=seed)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return SequenceState(request=state, index=index, params=params, generator=generator,
                             text=StreamText(request.stop), detok=IncrementalText(self.tokenizer))  # fmt: skip

    def timeout(self, request: GenerationRequest | ScoreRequest) -> float:
        if request.timeout is None:
            return self.limits.request_timeout
        return min(max(request.timeout, 0.0), self.limits.request_timeout)
