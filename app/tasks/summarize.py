"""Summaries by prompting. Chat models: an instruction in their chat template. Base models (GPT-2
style): the article followed by "TL;DR:", as in the GPT-2 paper. Long articles keep their lead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.tasks.family import Family, base_prompt_ids, chat_prompt_ids

INSTRUCTION = "Summarize the following article in two or three sentences.\n\n"


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    truncated: bool
    article_tokens: int  # tokens of the article that were kept


def prompt(tokenizer: Any, family: Family, article: str, budget: int) -> Prompt:
    """Fit the article into `budget` prompt tokens, cutting from the end (news puts the lead first)."""
    article = article.strip()
    words = tokenizer.encode(article, add_special_tokens=False)

    def render(ids: list[int]) -> list[int]:
        body = tokenizer.decode(ids)
        if family == "chat":
            return chat_prompt_ids(tokenizer, INSTRUCTION + body)
        return base_prompt_ids(tokenizer, f"{body}\nTL;DR:")

    overhead = len(render([])) + 2  # template tokens, with slack for merges at the seam
    keep = max(1, min(len(words), budget - overhead))
    ids = render(words[:keep])
    while len(ids) > budget and keep > 1:  # re-tokenizing at the cut can add a token or two
        keep -= max(1, len(ids) - budget)
        ids = render(words[:keep])
    return Prompt(ids, keep < len(words), keep)


def postprocess(generated: str) -> str:
    text = generated.strip()
    for marker in ("\n\n", "TL;DR:"):
        if marker in text:
            text = text.split(marker, 1)[0].strip()
    return text
