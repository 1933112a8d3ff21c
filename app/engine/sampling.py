"""Per-row sampling over a batch of logits, in batched tensor ops.

Each row carries its own controls and its own torch.Generator, so a seeded request draws the same
tokens whatever else shares its batch. Processing order and semantics follow transformers'
logits processors: repetition penalty, then temperature, top-k, top-p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.engine.types import SamplingParams
from app.models.numerics import elementwise


@dataclass
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    # (V,) bool on the logits' device: the ids of prompt + generated so far (`seen_mask`, kept up to date by
    # the sequence as tokens arrive); read only for the repetition penalty, so no row's history is copied
    # to the device every step
    seen: torch.Tensor | None = None


def seen_mask(ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """(vocab,) bool: True at each id in `ids`."""
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[torch.tensor(list(ids), dtype=torch.long, device=device)] = True
    return mask


def _controls(rows: Sequence[Sequence[float]], device: torch.device) -> torch.Tensor:
    """Per-row values (the row's position first) in one copy to the device: (n, k) float32."""
    return torch.tensor(rows, dtype=torch.float32).to(device)


def apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, per row: seen tokens' logits / p (or * p if < 0).
    In place on `logits` (R, V); rows with a penalty of 1.0 or no `seen` are left alone."""
    picked = [(i, r.params.repetition_penalty) for i, r in enumerate(rows)
              if r.params.repetition_penalty != 1.0 and r.seen is not None]  # fmt: skip
    if not picked:
        return logits
    controls = _controls(picked, logits.device)  # (P, 2): row, penalty
    idx, penalty = controls[:, 0].long(), controls[:, 1:]  # (P,), (P, 1)
    seen = torch.stack([rows[i].seen for i, _ in picked])  # type: ignore[misc]  # (P, V)
    sub = logits.index_select(0, idx)  # (P, V)
    penalized = torch.where(sub < 0, sub * penalty, sub / penalty)
    logits.index_copy_(0, idx, torch.where(seen, penalized, sub))
    return logits


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    """Keep each row's top_k[i] largest logits (ties at the threshold kept, as in transformers). `k_max`:
    top_k's largest value when the caller knows it (reading it from the device would wait for it)."""
    k_max = int(top_k.max()) if k_max is None else k_max
    kth = torch.topk(logits, k_max, dim=-1).values.gather(1, (top_k - 1).unsqueeze(1))  # (R, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """transformers' TopPLogitsWarper per row: drop the low tail whose mass is <= 1 - top_p[i]."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)  # (R, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (R, V)
    remove_sorted = cumulative <= (1 - top_p).unsqueeze(1)
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(R, V) -> (R,) int64: torch.argmax(dim=-1) (the first index of each row's largest value), in C on the CPU
    where the elementwise kernels build: torch's took ~1.3 ms of a 32-row decode step."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.is_contiguous():
        ops = elementwise.load()
        if ops is not None:
            return ops.argmax(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
    """logits: (R, V) for R rows -> one token id per row. The host waits on the device once (the ids); each
    stage's per-row controls travel in one copy."""
    logits = logits.float()
    if any(r.params.repetition_penalty != 1.0 and r.seen is not None for r in rows):
        logits = apply_repetition_penalty(logits.clone(), rows)
    vocab = logits.shape[-1]
    picked = [(i, r.params.temperature, min(r.params.top_k, vocab) or vocab, r.params.top_p)
              for i, r in enumerate(rows) if not r.params.greedy]  # fmt: skip
    if not picked:
        return greedy(logits).tolist()

    out = greedy(logits)  # (R,) greedy answer, overwritten for sampled rows
    controls = _controls(picked, logits.device)  # (S, 4): row, temperature, top_k, top_p
    idx = controls[:, 0].long()  # (S,)
    sub = logits.index_select(0, idx) / controls[:, 1:2]  # (S, V)
    if any(k < vocab for _, _, k, _ in picked):
        sub = apply_top_k(sub, controls[:, 2].long(), max(k for _, _, k, _ in picked))
    if any(p < 1.0 for *_, p in picked):
        sub = apply_top_p(sub, controls[:, 3])
    probs = sub.softmax(dim=-1)  # (S, V)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Each row's noise comes from
    # its own generator, so its draw does not depend on the other rows.
    noise = torch.empty_like(probs)
    for j, (i, *_) in enumerate(picked):
        noise[j].exponential_(generator=rows[i].generator)
    out.index_copy_(0, idx, (probs / noise).argmax(dim=-1))
    return out.tolist()
