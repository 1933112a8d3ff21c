"""Token log-probabilities under the model's raw distribution (before temperature, top-k/p, penalties).

That is what OpenAI-style `logprobs` report, and what perplexity needs.
"""

from __future__ import annotations

import torch

from app.engine.types import TokenLogprob

# Rows of logits turned into log-probabilities at once while scoring a prompt: bounds the memory
# of a long prompt's (positions, vocabulary) logits to CHUNK * V floats.
CHUNK = 256


def token_logprobs(logits: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
    """logits: (N, V) predicting targets[i] at row i -> N TokenLogprobs with `top` alternatives each."""
    out: list[TokenLogprob] = []
    for start in range(0, len(targets), CHUNK):
        chunk = logits[start : start + CHUNK].float().log_softmax(-1)  # (n, V)
        ids = torch.tensor(targets[start : start + CHUNK], device=chunk.device)  # (n,)
        chosen = chunk.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()  # (n,)
        if top > 0:
            values, indices = chunk.topk(min(top, chunk.shape[-1]), dim=-1)  # (n, top)
            alts = [tuple(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        else:
            alts = [() for _ in chosen]
        out.extend(TokenLogprob(t, lp, a) for t, lp, a in zip(targets[start : start + CHUNK], chosen, alts,
                                                             strict=True))  # fmt: skip
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
