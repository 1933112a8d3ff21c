"""The task prompt candidates: every template renders, the served one is among them, turns and stops as said."""

from __future__ import annotations

from typing import Any

import pytest

from app.tasks import summarize, translate


class Tok:
    """Records what it is asked to encode; a chat template that shows each turn."""

    chat_template = "yes"

    def __init__(self) -> None:
        self.texts: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.texts.append(text)
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool) -> Any:
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


@pytest.mark.parametrize("family", ["base", "chat"])
def test_every_translation_template_renders_and_the_chosen_one_is_served(family: Any) -> None:
    assert translate.CHOSEN[family] in translate.TEMPLATES[family]
    for name in translate.TEMPLATES[family]:
        tok = Tok()
        ids = translate.prompt_ids(tok, family, "  Hello\n there ", "en", "de", name)
        assert tok.decode(ids).count("Hello there") == 1  # the text once, its whitespace folded
    served, chosen = Tok(), Tok()
    assert (translate.prompt_ids(served, family, "Hi", "en", "fr")
            == translate.prompt_ids(chosen, family, "Hi", "en", "fr", translate.CHOSEN[family]))  # fmt: skip


def test_news_demonstrations_become_earlier_chat_turns() -> None:
    tok = Tok()
    text = tok.decode(translate.prompt_ids(tok, "chat", "Hi", "en", "fr", "instruction-news-turns"))
    assert text.count("<user>") == 4 and text.count("<assistant>") == 4  # three demonstrations + the question
    assert "<assistant>Le gouvernement a annoncé mardi" in text and text.endswith("Hi</user><assistant>")


def test_pairs_without_demonstrations_fall_back_to_zero_shot() -> None:
    tok = Tok()
    assert tok.decode(translate.prompt_ids(tok, "base", "Hi", "en", "ja", "news-3")) == "English: Hi\nJapanese:"


@pytest.mark.parametrize("family", ["base", "chat"])
def test_every_summary_template_keeps_its_stop_and_the_budget(family: Any) -> None:
    assert summarize.CHOSEN[family] in summarize.TEMPLATES[family]
    article = "The council approved the bridge. " * 40
    for name, template in summarize.TEMPLATES[family].items():
        p = summarize.prompt(Tok(), family, article, 300, name)
        assert p.stop == template.stop and len(p.ids) <= 300 and p.truncated
        assert Tok().decode(p.ids).startswith("<user>" if family == "chat" else "The council")
    assert summarize.prompt(Tok(), "base", article, 10_000).stop == ("\n",)
