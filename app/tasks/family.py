"""Which prompt style a model gets: chat models are addressed through their chat template, base
(GPT-2-style) models through plain-text patterns they saw in pretraining."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

Family = Literal["base", "chat"]


def family_of(tokenizer: Any) -> Family:
    return "chat" if getattr(tokenizer, "chat_template", None) else "base"


def chat_prompt_ids(tokenizer: Any, user: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
    """The chat template around earlier (user, assistant) turns and one user turn, ending where the
    assistant's reply begins."""
    messages = [{"role": role, "content": content} for turn in history
                for role, content in zip(("user", "assistant"), turn, strict=True)]  # fmt: skip
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def base_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """A plain-text prompt with the special tokens the tokenizer puts before text: Gemma's and Llama's <bos>
    (without it Gemma writes nonsense), nothing for GPT-2."""
    return list(tokenizer.encode(text))
