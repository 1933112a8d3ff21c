"""The run phase of a step: the scheduler's plan through the model runner, and the sampling of what it produces.

`decode` runs one token for every row in the batch; `prefill_chunk` the next chunk of the oldest long
prompt in the scheduler's `prefilling` (sized by ChunkPacer to the decode beside it); `prefill` each newly
admitted prompt, shortest first,
straight into its KV segment (after the longest prefix the prefix cache holds), or scores it; where the model
has a written-out prompt pass (int4 x int8, bf16), several prompts at a time (`_prefill_group`). What they
produce goes to the output stage (app/engine/output.py); a failed forward fails the requests it was for and
nothing else. Engine thread only.
"""

from __future__ import annotations

import logging
import time

import torch

from app.engine.constraints import Grammars
from app.engine.errors import StepFailed
from app.engine.limits import EngineLimits, EngineStats
from app.engine.logprobs import token_logprobs
from app.engine.model_runner import ModelRunner
from app.engine.output import Output
from app.engine.prefix_cache import PrefillKV, PrefixCache
from app.engine.sampling import SampleRow, sample, seen_mask
from app.engine.scheduler import ChunkPacer, Scheduler
from app.engine.state import RequestState, SequenceState, hand_off
from app.engine.types import Scores, TokenLogprob

log = logging.getLogger(__name__)

GROUP_TOKENS = 256  # prompt tokens per written-out prompt pass: past this, larger products gain little


class StepExecutor:
    def __init__(self, model_runner: ModelRunner, scheduler: Scheduler, prefix_cache: PrefixCache, output: Output,
                 stats: EngineStats, limits: EngineLimits, grammars: Grammars) -> None:  # fmt: skip
        self.model_runner = model_runner
        self.grammars = grammars
        self.scheduler = scheduler
        self.prefix_cache = prefix_cache
        self.output = output
        self.stats = stats
        self.limits = limits
        self.pacer = ChunkPacer(limits.prefill_chunk_tokens)
        self._decode_step_seconds = 0.0  # this step's decode (0: no rows), what the next chunk is sized against

    def decode(self) -> int:
        self._decode_step_seconds = 0.0
        if not self.model_runner.seqs:
            return 0
        seqs = list(self.model_runner.seqs)
        self.stats.batch_sizes[len(seqs)] += 1
        started = time.perf_counter()
        try:
            logits = self.model_runner.decode()  # (B, V)
            allowed = self._masked(logits, seqs)  # (B, V)
            tokens = sample(allowed, [SampleRow(s.params, s.generator, s.seen) for s in seqs])
            scored = self._logprobs(seqs, logits, tokens)
            self._decode_step_seconds = time.perf_counter() - started
            self.stats.decode_seconds += self._decode_step_seconds
        except Exception as exc:
            log.exception("decode step failed for %d rows", len(seqs))
            for seq in self.model_runner.clear():
                self.output.fail(seq.request, StepFailed(f"the model step failed: {type(exc).__name__}"))
            return 0
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            self.output.contained(seq.request, self.output.accept, seq, token, logprob=scored.get(i))
        hand_off()
        return len(seqs)

    def _masked(self, logits: torch.Tensor, seqs: list[SequenceState]) -> torch.Tensor:
        """logits (R, V) with each constrained row's disallowed tokens at -inf (app/engine/constraints.py)."""
        guides = [s.guide for s in seqs]
        if all(g is None for g in guides):
            return logits
        started = time.perf_counter()
        out = self.grammars.mask(logits, guides)
        self.stats.constraint_mask_seconds += time.perf_counter() - started
        self.stats.constraint_mask_steps += 1
        return out

    @staticmethod
    def _logprobs(seqs: list[SequenceState], logits: torch.Tensor, tokens: list[int]) -> dict[int, TokenLogprob]:
        """The drawn tokens' log-probabilities (under the raw logits (B, V)) of the rows (positions in `seqs`)
        that asked for them: one pass and one copy to the host for all of them."""
        wanted = [i for i, s in enumerate(seqs) if s.wants_logprobs is not None]
        if not wanted:
            return {}
        rows = logits[wanted] if len(wanted) < len(seqs) else logits  # (W, V)
        found = token_logprobs(rows, [tokens[i] for i in wanted], [seqs[i].wants_logprobs or 0 for i in wanted])
        return dict(zip(wanted, found, strict=True))

    def prefill(self, admitted: list[RequestState]) -> int:
        produced = 0
        group: list[RequestState] = []
        # Admission is FIFO; within a step, shortest prompt first: each request's first token is sent
        # as soon as its own prefill (or group's) ends, so this ordering minimises the step's mean time to first
        # token. Where the model has a written-out prompt pass, prompts go through it in groups of up to
        # GROUP_TOKENS tokens: one product per layer for the group (fewer, larger calls), first tokens sent
        # after each group.
        # (A prompt longer than a chunk is not among them: the scheduler put it in `prefilling`.)
        for state in sorted(admitted, key=lambda s: s.prefill_tokens):
            if state.scoring:
                produced += self._score(state)
                continue
            wants_prompt = state.prompt_logprobs is not None
            if self.model_runner.prompt_step is not None and not wants_prompt:
                group.append(state)
                if sum(s.prompt_len for s in group) >= GROUP_TOKENS:
                    produced += self._prefill_group(group)
                    group = []
                continue
            started = time.perf_counter()
            try:
                # prompt log-probabilities need every prompt position computed: no reuse then
                hit = None if wants_prompt else self.prefix_cache.match(state.prompt_ids)
                logits, kv, scored = self.model_runner.prefill(state, hit)  # (V,)
            except Exception as exc:
                self._failed(state, exc)
                continue
            produced += self._start(state, logits, kv, scored)
            self.stats.prefill_seconds += time.perf_counter() - started
            hand_off()  # its first tokens go now, not after the step's other prefills
        if group:
            produced += self._prefill_group(group)
        self.model_runner.settle()
        return produced

    def _prefill_group(self, group: list[RequestState]) -> int:
        """Whole prompts in one written-out pass (each after the longest prefix the cache holds); a failed pass
        fails the group's requests and nothing else."""
        started = time.perf_counter()
        try:
            hits = [self.prefix_cache.match(s.prompt_ids) for s in group]  # all before any store: hits stay valid
            jobs = [(s, s.prompt_len, hit) for s, hit in zip(group, hits, strict=True)]
            results = self.model_runner.prefill_group(jobs)
        except Exception as exc:
            for state in group:
                self._failed(state, exc)
            return 0
        produced = sum(self._start(state, logits, kv, None) for state, (logits, kv) in zip(group, results, strict=True))
        self.stats.prefill_seconds += time.perf_counter() - started
        hand_off()
        return produced

    def _start(self, state: RequestState, logits: torch.Tensor, kv: PrefillKV,
               scored: list[TokenLogprob] | None) -> int:  # fmt: skip
        """A prefilled prompt: keep its K/V, draw its first tokens (from logits (V,)) and start it; a failure here
        fails this request only."""
        try:
            self.prefix_cache.store(state.prompt_ids, kv)
            tokens, first = self._first_tokens(state, logits)
        except Exception as exc:
            self._failed(state, exc)
            return 0
        self.scheduler.started(state)
        return self.output.contained(state, self.output.begin, state, tokens, first, scored) or 0

    def _failed(self, state: RequestState, exc: Exception, what: str = "prefill") -> None:
        """A forward that failed for `state`: logged, and the request fails (its budget and segment freed)."""
        log.exception("%s failed for request %s", what, state.id, exc_info=exc)
        self.output.fail(state, StepFailed(f"the model step failed: {type(exc).__name__}"))

    def prefill_chunk(self) -> int:
        """The next chunk of the oldest long prompt being prefilled; when it was the last, the prompt joins."""
        if not self.scheduler.prefilling:
            return 0
        state = self.scheduler.prefilling[0]
        assert isinstance(state, RequestState)
        started = time.perf_counter()
        try:
            hit = self.prefix_cache.match(state.prompt_ids) if state.prefilled == 0 else None
            start = hit.length if hit is not None else state.prefilled
            stop = min(state.prompt_len, start + self.pacer.size())
            logits = self.model_runner.prefill_chunk(state, stop, hit)  # (V,)
            self.pacer.observe(stop - start, time.perf_counter() - started, self._decode_step_seconds)
            if stop < state.prompt_len:
                self.stats.prefill_seconds += time.perf_counter() - started
                return 0
            self.scheduler.chunk_done(state)
            kv = self.model_runner.prompt_kv(state)
        except Exception as exc:
            self.scheduler.chunk_done(state)
            self._failed(state, exc)  # frees its reservation
            return 0
        produced = self._start(state, logits, kv, None)
        self.stats.prefill_seconds += time.perf_counter() - started
        return produced

    def _first_tokens(self, state: RequestState, logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each sequence's first token, drawn from the prompt's last logits (V,), and its log-probability when
        the request asked for them."""
        seqs = state.sequences
        for seq in seqs:
            if seq.params.repetition_penalty != 1.0:
                seq.seen = seen_mask(state.prompt_ids, logits.shape[-1], logits.device)
        shared = logits.unsqueeze(0).expand(len(seqs), -1)  # (n, V)
        allowed = self._masked(shared, seqs)  # (n, V)
        tokens = sample(allowed, [SampleRow(s.params, s.generator, s.seen) for s in seqs]) if seqs else []
        scored = self._logprobs(seqs, shared, tokens)
        return tokens, [scored.get(i) for i in range(len(seqs))]

    def _score(self, state: RequestState) -> int:
        started = time.perf_counter()
        try:
            logprobs, kv = self.model_runner.score(state, self.prefix_cache.match(state.prompt_ids))
            self.prefix_cache.store(state.prompt_ids, kv)
        except Exception as exc:
            self._failed(state, exc, "scoring")
            return 0
        finally:
            self.scheduler.release(state)  # its segment, held while it was computed
        self.stats.prefill_seconds += time.perf_counter() - started
        self.stats.prompt_tokens += state.prefill_tokens
        state.channel.put(Scores(tuple(logprobs), tuple(len(c) for c in state.continuations)))
        self.output.finish(state)
        return 0
