"""Summaries by prompting. Chat models: an instruction in their chat template. Base models (GPT-2
style): the article followed by a cue ("TL;DR:" as in the GPT-2 paper, or others). Long articles keep
their lead.

Each family has a few candidate prompts (TEMPLATES); the one served (CHOSEN) was chosen by 5-fold
cross-validation of ROUGE-L on the FRANK articles (python -m app.eval.choose --task summarize;
docs/tasks.md): SmolLM2 (chat) 15.8 cross-validated, gemma-3-270m (base) 14.8 ("TL;DR:" 10.7 in-sample). A base
model's summary ends at its first line break: after it, gemma-3-270m's continuations repeat themselves;
chat models write a paragraph, which may hold single line breaks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.tasks.family import Family, base_prompt_ids, chat_prompt_ids


@dataclass(frozen=True)
class Template:
    render: Callable[[Any, str], list[int]]  # (tokenizer, article) -> prompt ids
    stop: tuple[str, ...]


def _chat(before: str, after: str = "") -> Template:
    return Template(lambda tok, body: chat_prompt_ids(tok, f"{before}{body}{after}"), ("\n\n",))


def _base(after: str) -> Template:
    return Template(lambda tok, body: base_prompt_ids(tok, f"{body}{after}"), ("\n",))


TEMPLATES: dict[Family, dict[str, Template]] = {
    "base": {
        "tldr": _base("\nTL;DR:"),
        "summary": _base("\n\nSummary:"),
        "one-sentence": _base("\n\nThe article in one sentence:"),
    },
    "chat": {
        "instruction-2-3": _chat("Summarize the following article in two or three sentences.\n\n"),
        "instruction-1": _chat("Summarize the following article in one sentence.\n\n"),
        # the question after the article: nearest to where the answer starts
        "article-then-2-3": _chat("", "\n\nSummarize the article above in two or three sentences."),
        "article-then-tldr": _chat("", "\n\nTL;DR:"),
    },
}

# The template served per family: chosen by cross-validation (module docstring).
CHOSEN: dict[Family, str] = {"base": "one-sentence", "chat": "instruction-1"}


def template(family: Family, name: str | None = None) -> Template:
    return TEMPLATES[family][name or CHOSEN[family]]


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    truncated: bool
    article_tokens: int  # tokens of the article that were kept
    stop: tuple[str, ...]


def prompt(tokenizer: Any, family: Family, article: str, budget: int, name: str | None = None) -> Prompt:
    """Fit the article into `budget` prompt tokens, cutting from the end (news puts the lead first)."""
    chosen = template(family, name)
    article = article.strip()
    words = tokenizer.encode(article, add_special_tokens=False)

    def render(ids: list[int]) -> list[int]:
        return chosen.render(tokenizer, tokenizer.decode(ids))

    overhead = len(render([])) + 2  # template tokens, with slack for merges at the seam
    keep = max(1, min(len(words), budget - overhead))
    ids = render(words[:keep])
    while len(ids) > budget and keep > 1:  # re-tokenizing at the cut can add a token or two
        keep -= max(1, len(ids) - budget)
        ids = render(words[:keep])
    return Prompt(ids, keep < len(words), keep, chosen.stop)


def postprocess(generated: str) -> str:
    text = generated.strip()
    for marker in ("\n\n", "TL;DR:"):
        if marker in text:
            text = text.split(marker, 1)[0].strip()
    return text
