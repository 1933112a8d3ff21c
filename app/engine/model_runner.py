"""The model runner: the running batch's forward passes over the ragged KV cache, rows joining and leaving.

Holds the sequences (`seqs`, in batch order) next to the cache; each joined sequence holds a segment of it
(`seq.segment`). A prompt takes its segment when its prefill starts (`open`, until its first sequence joins;
its siblings copy it), and every prompt, whole or in chunks, with or without a reused prefix, is computed
into that segment the same way (`prefill_chunk`): through the model's forward, or where the model has a
written-out prompt pass (app/models/layers/decode_step.LlamaStep.prefill), through it, several prompts in one pass
(`prefill_group`). `join` and `leave` are the only places that change the
rows, and `leave` gives the segment back.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from app.engine.kv_cache import KV, RaggedCache, Segment
from app.engine.kv_views import DecodeView, PrefillCache, PromptView
from app.engine.logprobs import prompt_logprobs
from app.engine.prefix_cache import Hit, PrefillKV
from app.engine.state import RequestState, SequenceState
from app.engine.types import TokenLogprob
from app.models.layers import decode_step, prompt_attention
from app.models.numerics import modes
from app.models.numerics.modes import prompt_pass


def cache_keyword(model: Any) -> str:
    """The name this transformers' forward takes its KV cache under: `past_key_values` up to 5.17 at least,
    `cache` later (the old name still works there, with a warning, until 5.40). pyproject allows both."""
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


class ModelRunner:
    def __init__(self, model: Any, max_rows: int, max_tokens: int | None = None, kernel: bool | None = None,
                 kv_cache: str = "auto") -> None:  # fmt: skip
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # the arena: the token budget (the scheduler charges each row whole blocks within it) and a token per row
        self.cache = RaggedCache(model.config.num_hidden_layers, max_tokens, max_rows, kernel=kernel,
                                 kv_dtype=modes.kv_cache_dtype(model, kv_cache))  # fmt: skip
        self.seqs: list[SequenceState] = []
        self.open: dict[str, tuple[RequestState, Segment]] = {}  # request id -> its prompt's segment, not joined
        # the model's decode written out without transformers' plumbing (same results), where there is one
        self.step = decode_step.for_model(model)
        # prompts through the step's written-out pass too, several in one (`prefill_group`), where it has one
        self.prompt_step = self.step if isinstance(self.step, decode_step.WrittenOut) and self.step.prompts else None
        self.cache_kw = cache_keyword(model)
        # models whose layers mix full and sliding-window attention (Gemma 3): the decode mask differs by layer
        config = model.config
        mixed = "sliding_attention" in (getattr(config, "layer_types", None) or ())
        self.sliding_window: int | None = getattr(config, "sliding_window", None) if mixed else None

    def kv_example(self) -> PrefillKV:
        """The K/V of a one-token forward: per layer (1, H, 1, D), what caches shape their buffers on."""
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device), **{self.cache_kw: cache},
                   use_cache=True, logits_to_keep=1)  # fmt: skip
        return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]

    def _hidden(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """One row's last hidden states (P, E) for `ids` (1, P), its K/V written through `cache`."""
        out = self.model.base_model(input_ids=ids, use_cache=True, **{self.cache_kw: cache})
        hidden: torch.Tensor = out.last_hidden_state[0]
        return hidden

    def allocate(self, example: PrefillKV | None = None) -> None:
        """Allocate the KV arena now (zero-filled, resident) and build the decode kernel, not at the first
        request. `example`: what `kv_example` returns, when the caller has it already."""
        if not self.cache.has_layout:
            self.cache.allocate(example or self.kv_example(), q_heads=int(self.model.config.num_attention_heads))

    def _segment(self, request: RequestState) -> Segment:
        """The segment `request`'s prompt is computed into: taken at its first chunk, kept until it joins."""
        if not self.cache.has_layout:
            self.allocate()
        entry = self.open.get(request.id)
        if entry is None:
            entry = (request, self.cache.hold(request.reserved_tokens))
            self.open[request.id] = entry
        return entry[1]

    def prefill(
        self, request: RequestState, prefix: Hit | None = None
    ) -> tuple[torch.Tensor, PrefillKV, list[TokenLogprob] | None]:
        """Compute the whole prompt (after `prefix`, a kept prompt sharing its first tokens) into its segment;
        return its last-position logits (V,), the prompt's K/V (1, H, P, D) per layer, and the prompt's token
        log-probabilities when the request asked for them. Its first sequence joins with `join`.

        Prompts are prefilled one at a time, unpadded: padding a group to its longest prompt wasted
        ~40% of prefill compute on mixed lengths, and a few hundred tokens already fill the matmuls.
        """
        top = request.prompt_logprobs
        if top is None:
            logits, kv = self._compute(request, request.prompt_len, prefix)
            return logits, kv, None
        assert prefix is None and request.prefilled == 0, "prompt log-probabilities need every position computed"
        cache, ids = self._forward_into(self._segment(request), request.prompt_ids, 0, None, request.prompt_len)
        with prompt_pass():
            hidden = self._hidden(ids, cache)  # (P, E)
            output = self.model.get_output_embeddings()
            logits = output(hidden[-1:])[0]  # (V,)
            scored = prompt_logprobs(hidden, output, request.prompt_ids, top)
        request.prefilled = request.prompt_len
        return logits, cache.kv(), scored

    def prefill_chunk(self, request: RequestState, stop: int, prefix: Hit | None = None) -> torch.Tensor:
        """Compute prompt tokens [request.prefilled, stop) into the prompt's segment (a `prefix` first fills its
        start); return the logits (V,) at position stop - 1."""
        return self._compute(request, stop, prefix, keep_kv=False)[0]

    def _prompt_kernel(self) -> prompt_attention.PromptAttentionKernel | None:
        """The prompt attention kernel for this model and cache (it reads the arena's layout: the decode kernel's)."""
        step = self.prompt_step
        if step is None or not self.cache.transposed:
            return None
        return prompt_attention.load(step.kv_heads, step.q_heads // step.kv_heads, step.head_dim,
                                     self.cache.store)  # fmt: skip

    def prefill_group(self, group: list[tuple[RequestState, int, Hit | None]],
                      keep_kv: bool = True) -> list[tuple[torch.Tensor, KV]]:  # fmt: skip
        """Prompt tokens [request.prefilled, stop) of each (request, stop, prefix) in one written-out pass
        (where the model has one: `prompt_step`); per request, the logits (V,) at position stop - 1 and
        its K/V so far (1, H, stop, D) per layer (with `keep_kv`; a chunk's caller does not need it). A prompt's
        results do not depend on the others in the group."""
        assert self.prompt_step is not None
        prompts, ids = [], []
        for request, stop, prefix in group:
            seg = self._segment(request)
            filled = self._with_prefix(seg, request.prefilled, prefix)
            prompts.append((seg, filled, stop - filled))
            ids.extend(request.prompt_ids[filled:stop])
        view = PromptView(self.cache, prompts, self.device, self._prompt_kernel())
        last = torch.tensor(view.offsets[1:], device=self.device) - 1  # (P,)
        logits = self.prompt_step.prefill(torch.tensor(ids, device=self.device), view.positions, last, view)
        kvs = []
        for (request, stop, _), (seg, filled, _), kv in zip(group, prompts, view.kv, strict=True):
            request.prefilled = stop
            # after held tokens, the prompt's K/V so far is in its segment: one copy out, where wanted
            kvs.append(self.cache.read_all(seg, stop) if filled and keep_kv else kv)
        return list(zip(logits.unbind(0), kvs, strict=True))

    def _compute(self, request: RequestState, stop: int, prefix: Hit | None,
                 keep_kv: bool = True) -> tuple[torch.Tensor, KV]:  # fmt: skip
        if self.prompt_step is not None:
            return self.prefill_group([(request, stop, prefix)], keep_kv)[0]
        cache, ids = self._forward_into(self._segment(request), request.prompt_ids, request.prefilled, prefix, stop)
        with prompt_pass():
            out = self.model(input_ids=ids, **{self.cache_kw: cache}, use_cache=True, logits_to_keep=1)
        request.prefilled = stop
        logits: torch.Tensor = out.logits[0, -1, :]  # (V,)
        return logits, cache.kv()

    def _forward_into(self, seg: Segment, prompt: list[int], filled: int, prefix: Hit | None,
                      stop: int) -> tuple[PrefillCache, torch.Tensor]:  # fmt: skip
        """What a prompt's forward into `seg` takes: the cache to pass (a `prefix`'s K/V written first, then
        counted as filled) and the ids (1, c) of prompt tokens [filled, stop) to compute."""
        filled = self._with_prefix(seg, filled, prefix)
        return PrefillCache(self.cache, seg, filled), torch.tensor([prompt[filled:stop]], device=self.device)

    def _with_prefix(self, seg: Segment, filled: int, prefix: Hit | None) -> int:
        """How many tokens `seg` holds before a pass: `filled`, or after a `prefix` (a kept prompt sharing the
        first tokens) is written into it, the prefix's length."""
        if prefix is None:
            return filled
        for layer, (k, v) in enumerate(prefix.gather()):
            self.cache.write(layer, seg, 0, k, v)
        return prefix.length

    def prompt_kv(self, request: RequestState) -> PrefillKV:
        """The K/V of a prompt computed into its (open) segment, (1, H, P, D) per layer: copies."""
        return self.cache.read_all(self.open[request.id][1], request.prompt_len)

    def score(self, request: RequestState, prefix: Hit | None = None) -> tuple[list[float], PrefillKV]:
        """Sum of log p(continuation tokens | prompt) for each of `request.continuations`; also the prompt's K/V.

        Scoring is a prefill like any other: the prompt (after `prefix`) is computed into a segment of its own,
        its last hidden state predicts every continuation's first token, and each continuation is then a chunk
        after the prompt (written over the previous one's). The segment is given back at the end."""
        seg = self.cache.hold(request.reserved_tokens)
        output = self.model.get_output_embeddings()
        length = request.prompt_len
        try:
            cache, ids = self._forward_into(seg, request.prompt_ids, 0, prefix, length)
            with prompt_pass():
                hidden = self._hidden(ids, cache)  # (P, E)
                first = output(hidden[-1:]).float().log_softmax(-1)[0]  # (V,): the first token of each continuation
                sums = []
                for continuation in request.continuations:
                    total = first[continuation[0]]
                    if len(continuation) > 1:
                        rest = torch.tensor([continuation[:-1]], device=self.device)  # (1, c - 1)
                        h = self._hidden(rest, PrefillCache(self.cache, seg, length))  # (c - 1, E)
                        targets = torch.tensor(continuation[1:], device=self.device).unsqueeze(1)  # (c - 1, 1)
                        total = total + output(h).float().log_softmax(-1).gather(1, targets).sum()
                    sums.append(float(total))
            return sums, cache.kv()
        finally:
            self.cache.drop(seg)

    def decode(self) -> torch.Tensor:
        """One step for every row: feed each row's last token; return logits (B, V)."""
        view = DecodeView(self.cache, [s.segment for s in self.seqs], [s.kv_len for s in self.seqs])  # type: ignore[misc]
        last = torch.tensor([s.tokens[-1] for s in self.seqs], device=self.device)  # (B,)
        kv_len = torch.tensor([s.kv_len for s in self.seqs], device=self.device)  # (B,): the new token's position
        logits = self.forward_step(view, last, kv_len)
        for s in self.seqs:
            s.kv_len += 1
        return logits

    def forward_step(self, view: DecodeView, last: torch.Tensor, kv_len: torch.Tensor) -> torch.Tensor:
        """Tokens last (B,) at positions kv_len (B,) through the model over `view` (which stores their K/V);
        logits (B, V)."""
        if self.step is not None:
            logits: torch.Tensor = self.step(last, kv_len, view)  # (B, V)
        else:
            full = view.window_index()[2]  # (B, 1, 1, W)
            mask: torch.Tensor | dict[str, torch.Tensor] = full
            if self.sliding_window is not None:  # a mask per kind of layer, as transformers' generate passes them
                mask = {"full_attention": full, "sliding_attention": view.sliding_mask(self.sliding_window)}
            out = self.model(input_ids=last[:, None], attention_mask=mask, position_ids=kv_len[:, None],
                             **{self.cache_kw: view.as_cache()}, use_cache=True, logits_to_keep=1)  # fmt: skip
            logits = out.logits[:, -1, :]
        return logits

    def join(self, seq: SequenceState) -> None:
        """Add a prefilled sequence; its first generated token is fed at the next decode. The first of its
        request to join takes the segment its prefill wrote; its siblings copy it."""
        request = seq.request
        length = request.prompt_len
        entry = self.open.pop(request.id, None)
        if entry is not None:
            seq.segment = entry[1]
        else:
            sibling = next(s for s in request.sequences if s.segment is not None)
            seq.segment = self.cache.hold(request.reserved_tokens)
            assert sibling.segment is not None
            self.cache.copy(sibling.segment, seq.segment, length)
        seq.kv_len = length
        self.seqs.append(seq)

    def discard(self, request: RequestState) -> None:
        """A prompt that will not join (failed, cancelled, done on its first token): its segment is free."""
        entry = self.open.pop(request.id, None)
        if entry is not None:
            self.cache.drop(entry[1])

    def settle(self) -> None:
        """After a step: an open prompt whose request is done, or that is computed but nobody joined (it finished
        on its first token), gives its segment back; a long prompt between chunks keeps it."""
        for request, _ in list(self.open.values()):
            if request.done or request.prefilled >= request.prompt_len:
                self.discard(request)

    def leave(self, seq: SequenceState) -> None:
        self.seqs.remove(seq)
        if seq.segment is not None:
            self.cache.drop(seq.segment)
        seq.segment = None

    def clear(self) -> list[SequenceState]:
        """Drop every row and open prompt (after a failed step): the cache's contents can no longer be trusted."""
        dropped, self.seqs = self.seqs, []
        for s in dropped:
            s.segment = None
        self.open.clear()
        self.cache.drop_all()
        return dropped
