"""Perplexity of the served model over a text, through the OpenAI-compatible API or directly.

Through the API: each window of token ids goes to /v1/completions with echo + logprobs and
max_tokens=0; the server returns every prompt token's log-probability. Directly: transformers'
own loss on the same windows. The two must agree (tests check it; `textgen eval perplexity` prints both).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import torch


@dataclass(frozen=True)
class Perplexity:
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # predicted tokens (each window's first token is not predicted)

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens)


def windows(ids: list[int], size: int) -> list[list[int]]:
    """Non-overlapping windows of `size` tokens; a last one shorter than 2 tokens predicts nothing."""
    return [w for w in (ids[i : i + size] for i in range(0, len(ids), size)) if len(w) >= 2]


def tokenize(client: httpx.Client, text: str, lines_per_call: int = 500) -> list[int]:
    """The server's token ids of `text`, sent in pieces of whole lines (bodies stay small)."""
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for i in range(0, len(lines), lines_per_call):
        r = client.post("/tokenize", json={"text": "".join(lines[i : i + lines_per_call]),
                                           "add_special_tokens": False})  # fmt: skip
        r.raise_for_status()
        ids.extend(r.json()["tokens"])
    return ids


def window_nll_api(client: httpx.Client, window: list[int]) -> float:
    r = client.post("/v1/completions", json={"prompt": window, "max_tokens": 0, "echo": True, "logprobs": 0})
    r.raise_for_status()
    logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert logprobs[0] is None and len(logprobs) == len(window)
    return -float(sum(logprobs[1:]))


def via_api(client: httpx.Client, chunks: list[list[int]], concurrency: int = 4) -> Perplexity:
    """Several windows in flight, so the engine always has the next prefill queued."""
    with ThreadPoolExecutor(concurrency) as pool:
        nlls = list(pool.map(lambda w: window_nll_api(client, w), chunks))
    return Perplexity(sum(nlls), sum(len(w) - 1 for w in chunks))


@torch.inference_mode()
def direct(model: Any, chunks: list[list[int]]) -> Perplexity:
    """transformers' mean cross-entropy per window (labels = inputs, shifted inside the model)."""
    device = next(model.parameters()).device
    nll = 0.0
    for w in chunks:
        ids = torch.tensor([w], device=device)  # (1, n)
        nll += float(model(input_ids=ids, labels=ids).loss) * (len(w) - 1)
    return Perplexity(nll, sum(len(w) - 1 for w in chunks))
