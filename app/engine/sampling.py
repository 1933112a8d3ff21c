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


@dataclass
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    history: Sequence[int]  # prompt + generated ids; read only for the repetition penalty


def apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, per row: seen tokens' logits / p (or * p if < 0)."""
    for i, row in enumerate(rows):
        penalty = row.params.repetition_penalty
        if penalty == 1.0 or not row.history:
            continue
        ids = torch.tensor(row.history, dtype=torch.long, device=logits.device)  # (L,)
        seen = logits[i].gather(0, ids)  # (L,)
        logits[i].scatter_(0, ids, torch.where(seen < 0, seen * penalty, seen / penalty))
    return logits


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k[i] largest logits (ties at the threshold kept, as in transformers)."""
    k_max = int(top_k.max())
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


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
    """logits: (R, V) for R rows -> one token id per row."""
    logits = logits.float()
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        logits = apply_repetition_penalty(logits.clone(), rows)
    greedy = [r.params.greedy for r in rows]
    if all(greedy):
        return logits.argmax(dim=-1).tolist()

    out = logits.argmax(dim=-1)  # (R,) greedy answer, overwritten for sampled rows
    idx = [i for i, g in enumerate(greedy) if not g]
    sub_rows = [rows[i] for i in idx]
    sub = logits[idx]  # (S, V)
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in sub_rows], device=device)  # (S,)
    sub = sub / temps.unsqueeze(1)
    top_k = [min(r.params.top_k, sub.shape[-1]) for r in sub_rows]
    if any(top_k):
        k = torch.tensor([t if t > 0 else sub.shape[-1] for t in top_k], device=device)  # (S,)
        sub = apply_top_k(sub, k)
    top_p = [r.params.top_p for r in sub_rows]
    if any(p < 1.0 for p in top_p):
        sub = apply_top_p(sub, torch.tensor(top_p, device=device))
    probs = sub.softmax(dim=-1)  # (S, V)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Each row's noise comes from
    # its own generator, so its draw does not depend on the other rows.
    noise = torch.empty_like(probs)
    for j, row in enumerate(sub_rows):
        noise[j].exponential_(generator=row.generator)
    out[idx] = (probs / noise).argmax(dim=-1)
    return out.tolist()
