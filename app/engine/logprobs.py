"""Token log-probabilities under the model's raw distribution (before temperature, top-k/p, penalties).

That is what OpenAI-style `logprobs` report, and what perplexity needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.engine.types import TokenLogprob

# Rows of logits turned into log-probabilities at once while scoring a prompt: bounds the memory
# of a long prompt's (positions, vocabulary) logits to CHUNK * V floats.
CHUNK = 256


def token_logprobs(logits: torch.Tensor, targets: list[int], top: int | Sequence[int]) -> list[TokenLogprob]:
    """logits: (N, V) predicting targets[i] at row i -> N TokenLogprobs with `top` alternatives each (or
    top[i] for row i). One log_softmax and one copy to the host per CHUNK rows."""
    tops = [top] * len(targets) if isinstance(top, int) else list(top)
    out: list[TokenLogprob] = []
    for start in range(0, len(targets), CHUNK):
        chunk = logits[start : start + CHUNK].float().log_softmax(-1)  # (n, V)
        wanted, want = targets[start : start + CHUNK], tops[start : start + CHUNK]
        ids = torch.tensor(wanted, device=chunk.device)  # (n,)
        table = chunk.gather(1, ids.unsqueeze(1))  # (n, 1)
        k = min(max(want), chunk.shape[-1])
        if k > 0:
            values, indices = chunk.topk(k, dim=-1)  # (n, k); ids are exact in float32 (< 2**24)
            table = torch.cat([table, values, indices.to(table.dtype)], dim=1)  # (n, 1 + 2k)
        for t, n, row in zip(wanted, want, table.tolist(), strict=True):
            alts = tuple(zip((int(i) for i in row[1 + k : 1 + k + n]), row[1 : 1 + n], strict=True))
            out.append(TokenLogprob(t, row[0], alts))
    return out


def prompt_logprobs(hidden: torch.Tensor, output: torch.nn.Module, prompt: list[int], top: int) -> list[TokenLogprob]:
    """hidden: (P, H), the last hidden states of the whole prompt -> log p(prompt[i] | prompt[:i]) for
    i >= 1, through the output layer `output` in chunks."""
    out: list[TokenLogprob] = []
    for start in range(0, len(prompt) - 1, CHUNK):
        stop = min(start + CHUNK, len(prompt) - 1)
        logits = output(hidden[start:stop])  # (n, V): position p predicts token p + 1
        out.extend(token_logprobs(logits, prompt[start + 1 : stop + 1], top))
    return out
