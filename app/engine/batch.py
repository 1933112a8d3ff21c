"""The running batch: the model's forward passes over a SlotCache, rows joining and leaving.

Holds the sequences in slot order (`seqs[i].slot == i`) next to the cache; `join` and `leave` are the
only places that change either, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from app.engine.kv_cache import RowCache, SlotCache
from app.engine.logprobs import prompt_logprobs
from app.engine.prefix_cache import Hit, PrefillKV
from app.engine.state import RequestState, SequenceState
from app.engine.types import TokenLogprob
from app.models import decode_step
from app.models.numerics import prompt_pass


class Batch:
    def __init__(self, model: Any, max_rows: int, max_tokens: int | None = None, stage_tokens: int = 0) -> None:
        self.model = model
        # One row, outside the batch, that a long prompt is prefilled into chunk by chunk while the batch keeps
        # decoding (its columns stay put; the batch's move with every step): per layer (1, H, stage_tokens, D)
        self.stage_tokens = stage_tokens
        self.staging: PrefillKV | None = None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = SlotCache(model.config.num_hidden_layers, max_rows, max_tokens)
        self.seqs: list[SequenceState] = []
        self._open: RequestState | None = None  # prefilled into the next free slot, not joined yet
        # the model's decode written out without transformers' plumbing (same results), where there is one
        self.step = decode_step.for_model(model)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool mask -> additive float mask in the model's dtype (works for sdpa and eager attention)."""
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    def _cache_from(self, prefix: PrefillKV | None, rows: int = 1) -> DynamicCache:
        """A fresh cache holding `prefix` (read, never written: the forward appends by concatenation)."""
        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(prefix or []):
            cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), i)  # (rows, H, n, D)
        return cache

    def kv_example(self) -> PrefillKV:
        """The K/V of a one-token forward: per layer (1, H, 1, D), what caches shape their buffers on."""
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device), cache=cache,
                   use_cache=True, logits_to_keep=1)  # fmt: skip
        return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]

    def prefill(
        self, request: RequestState, prefix: Hit | None = None
    ) -> tuple[torch.Tensor, PrefillKV, list[TokenLogprob] | None]:
        """Run one prompt on its own, writing its K/V straight into the next free slot; return its
        last-position logits (V,), views of the prompt's K/V in that slot (1, H, P, D) per layer, valid until
        the batch next changes, and the prompt's token log-probabilities when the request asked for them.
        The slot joins with `join`; until then it is the next free one and the next prefill overwrites it.

        Prompts are prefilled one at a time, unpadded: padding a group to its longest prompt wasted
        ~40% of prefill compute on mixed lengths, and a few hundred tokens already fill the matmuls.
        With `prefix` (a kept prompt sharing its first tokens) only the rest is computed.
        """
        self._open = None
        length = request.prompt_len
        if not self.cache.has_layout:
            self.allocate()
        self.cache.reserve(len(self.seqs) + 1, length)
        kv = self.cache.open_row(length)
        done = 0
        if prefix is not None:
            prefix.copy_into(kv)
            done = prefix.length
        ids = torch.tensor([request.prompt_ids[done:]], device=self.device)  # (1, P - n)
        cache = RowCache(kv, done)
        top = getattr(request.request, "prompt_logprobs", None)
        scored: list[TokenLogprob] | None = None
        with prompt_pass():
            if top is None:
                out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                logits: torch.Tensor = out.logits[0, -1, :]  # (V,)
            else:
                assert done == 0, "prompt log-probabilities need the whole prompt computed"
                out = self.model.base_model(input_ids=ids, cache=cache, use_cache=True)
                hidden = out.last_hidden_state[0]  # (P, H)
                output = self.model.get_output_embeddings()
                logits = output(hidden[-1:])[0]  # (V,)
                scored = prompt_logprobs(hidden, output, request.prompt_ids, top)
        self._open = request
        return logits, kv, scored

    def score(
        self, prompt: list[int], continuations: list[list[int]], prefix_len: int = 0, prefix: PrefillKV | None = None
    ) -> tuple[list[float], PrefillKV]:
        """Sum of log p(continuation tokens | prompt) for each continuation, in one right-padded forward;
        also the K/V of the prompt alone.

        Only the positions that predict continuation tokens go through the output layer. With `prefix`
        (K/V of the first `prefix_len` prompt tokens, shared by every row) only the rest is computed.
        """
        rest = prompt[prefix_len:]
        seqs = [rest + c for c in continuations]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)  # (n, L), right-padded
        mask = torch.zeros((len(seqs), prefix_len + width), dtype=torch.long)  # (n, prefix + L)
        mask[:, :prefix_len] = 1
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, prefix_len : prefix_len + len(s)] = 1
        cache = self._cache_from(prefix, rows=len(seqs))
        with prompt_pass():
            hidden = self.model.base_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                           cache=cache, use_cache=True).last_hidden_state  # (n, L, H)  # fmt: skip
        # row 0 starts with the whole prompt: its first len(prompt) columns are the prompt's own K/V
        prompt_kv: PrefillKV = [
            (layer.keys[:1, :, : len(prompt)].clone(), layer.values[:1, :, : len(prompt)].clone())  # type: ignore[index,union-attr]
            for layer in cache.layers
        ]
        rows = torch.tensor([j for j, c in enumerate(continuations) for _ in c], device=self.device)  # (T,)
        # the token at position p is predicted by the hidden state at p - 1
        cols = torch.tensor([len(rest) - 1 + i for c in continuations for i in range(len(c))], device=self.device)
        targets = torch.tensor([t for c in continuations for t in c], device=self.device)  # (T,)
        with prompt_pass():
            logits = self.model.get_output_embeddings()(hidden[rows, cols]).float()  # (T, V)
        token_logprobs = logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)  # (T,)
        sums = torch.zeros(len(continuations), device=self.device).index_add_(0, rows, token_logprobs)
        return [float(x) for x in sums.tolist()], prompt_kv

    def decode(self) -> torch.Tensor:
        """One step for every row: feed each row's last token; return logits (B, V)."""
        cache = self.cache
        cache.reserve(len(self.seqs), max(s.kv_len for s in self.seqs))
        width = cache.width
        last = torch.tensor([[s.tokens[-1]] for s in self.seqs], device=self.device)  # (B, 1)
        kv_len = torch.tensor([s.kv_len for s in self.seqs], device=self.device)  # (B,)
        positions = kv_len.unsqueeze(1)  # (B, 1): the new token comes after the row's kv_len tokens
        cols = torch.arange(width + 1, device=self.device)  # (W+1,)
        allowed = cols.unsqueeze(0) >= (width - kv_len).unsqueeze(1)  # (B, W+1)
        mask = self._additive(allowed)[:, None, None, :]  # (B, 1, 1, W+1)
        if self.step is not None:
            logits: torch.Tensor = self.step(last[:, 0], kv_len, cache, mask)  # (B, V)
        else:
            out = self.model(
                input_ids=last, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1,
            )  # fmt: skip
            logits = out.logits[:, -1, :]
        cache.advance(1)
        for s in self.seqs:
            s.kv_len += 1
        return logits

    def allocate(self, example: PrefillKV | None = None) -> None:
        """Allocate the KV arena and the staging row now (zero-filled, resident), not at the first request.
        `example`: what `kv_example` returns, when the caller has it already."""
        example = example or self.kv_example()
        self.cache.allocate(example)
        if self.staging is None and self.stage_tokens:
            n = self.stage_tokens
            self.staging = [(k.new_zeros(1, k.shape[1], n, k.shape[3]), v.new_zeros(1, v.shape[1], n, v.shape[3]))
                            for k, v in example]  # fmt: skip

    def prefill_chunk(self, request: RequestState, stop: int, prefix: Hit | None = None) -> torch.Tensor:
        """Compute prompt tokens [request.prefilled, stop) of a long prompt into the staging row (a `prefix` first
        fills its start); return the logits (V,) at position stop - 1. `unstage` moves the whole prompt into
        the batch once it is done."""
        if self.staging is None:
            self.allocate()
        assert self.staging is not None and request.prompt_len <= self.stage_tokens
        views = [(k[:, :, : request.prompt_len], v[:, :, : request.prompt_len]) for k, v in self.staging]
        if prefix is not None:
            prefix.copy_into(views)
            request.prefilled = prefix.length
        ids = torch.tensor([request.prompt_ids[request.prefilled : stop]], device=self.device)  # (1, c)
        with prompt_pass():
            out = self.model(input_ids=ids, cache=RowCache(views, request.prefilled), use_cache=True, logits_to_keep=1)
        request.prefilled = stop
        logits: torch.Tensor = out.logits[0, -1, :]  # (V,)
        return logits

    def unstage(self, request: RequestState) -> PrefillKV:
        """Copy a fully prefilled staging row into the next free slot; like `prefill`, return views of it
        (1, H, P, D) per layer, and the slot joins with `join`."""
        assert self.staging is not None and request.prefilled == request.prompt_len
        length = request.prompt_len
        self.cache.reserve(len(self.seqs) + 1, length)
        kv = self.cache.open_row(length)
        for (dest_k, dest_v), (k, v) in zip(kv, self.staging, strict=True):
            dest_k.copy_(k[:, :, :length])
            dest_v.copy_(v[:, :, :length])
        self._open = request
        return kv

    def join(self, seq: SequenceState) -> None:
        """Add a prefilled sequence; its first generated token is fed at the next decode. The first of its
        request to join takes the slot its prefill wrote; its siblings copy that row."""
        length = seq.request.prompt_len
        if self._open is seq.request:
            seq.slot = self.cache.add_open_row(length)
            self._open = None
        else:
            sibling = next(s for s in seq.request.sequences if s.slot >= 0)
            self.cache.reserve(len(self.seqs) + 1, length)
            seq.slot = self.cache.copy_row(sibling.slot, length)
        seq.kv_len = length
        self.seqs.append(seq)
        assert self.seqs[seq.slot] is seq

    def settle(self) -> None:
        """After a step's prefills: a prefilled slot nobody joined is free again; an empty batch lets go of
        its buffers."""
        self._open = None
        if not self.seqs:
            self.cache.release()

    def leave(self, seq: SequenceState) -> None:
        slot = seq.slot
        moved = self.cache.remove_row(slot)
        last = self.seqs.pop()
        if moved is not None:
            self.seqs[slot] = last
            last.slot = slot
        seq.slot = -1
        if self.seqs:
            self.cache.shrink_window(max(s.kv_len for s in self.seqs))
        else:
            self.cache.release()

    def clear(self) -> list[SequenceState]:
        """Drop every row (after a failed step): the cache's contents can no longer be trusted."""
        dropped, self.seqs = self.seqs, []
        self._open = None
        for s in dropped:
            s.slot = -1
        self.cache.window.rows = 0
        self.cache.release()
        return dropped
