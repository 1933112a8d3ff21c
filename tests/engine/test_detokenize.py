"""Incremental detokenization gives the full decode's text after every token, decoding a few tokens a step."""

from __future__ import annotations

import random
from typing import Any

import pytest
from transformers import AutoTokenizer

from app.engine.detokenize import REPLACEMENT, IncrementalText
from app.models.loading.store import OFFLINE_DEFAULT, TINY_GPT2, ModelStore
from tests.conftest import STORE

TEXTS = [
    "Hello world, this is plain ASCII text with numbers 1234 and punctuation!?",
    "Café déjà vu — naïve façade, Ærøskøbing, Straße.",
    "日本語のテキストと中文字符，还有한국어도 있습니다。",
    "Emoji: 👩‍👩‍👧‍👦 🚀🔥 and flags 🇫🇷🇯🇵 mixed with text.",
    "def f(x):\n    return x ** 2  # code\n\n\tindented\r\nlines",
]


def _tokenizer(name: str) -> Any:
    store = ModelStore(STORE)
    if not store.has(name):
        store.pull(name)
    return AutoTokenizer.from_pretrained(store.path(name))


def _full(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


@pytest.mark.parametrize("name", [TINY_GPT2, OFFLINE_DEFAULT])
def test_matches_the_full_decode_after_every_token(name: str) -> None:
    tokenizer = _tokenizer(name)
    rng = random.Random(0)
    sequences = [list(tokenizer.encode(t, add_special_tokens=False)) for t in TEXTS]
    sequences.append([rng.randrange(len(tokenizer)) for _ in range(300)])  # anything a sampler may draw
    sequences.append(list(tokenizer.encode("".join(TEXTS), add_special_tokens=False))[3:])  # starts mid-word
    for ids in sequences:
        detok = IncrementalText(tokenizer)
        for n in range(1, len(ids) + 1):
            text = detok.update(ids[:n])
            full = _full(tokenizer, ids[:n])
            if not full.endswith(REPLACEMENT):
                assert text == full, (n, text, full)
            else:  # the last tokens end inside a character: held back until it is whole
                assert full.startswith(text)
        assert detok.final(ids) == _full(tokenizer, ids)


def test_cut_inside_a_character_ends_with_what_the_full_decode_gives() -> None:
    tokenizer = _tokenizer(TINY_GPT2)
    ids = list(tokenizer.encode("🚀", add_special_tokens=False))
    assert len(ids) > 1  # byte-level BPE splits the character
    detok = IncrementalText(tokenizer)
    assert detok.update(ids[:1]) == ""
    assert detok.final(ids[:1]) == _full(tokenizer, ids[:1])


def test_each_step_decodes_a_window_not_the_whole_sequence() -> None:
    tokenizer = _tokenizer(TINY_GPT2)
    ids = list(tokenizer.encode(" ".join(TEXTS) * 8, add_special_tokens=False))
    decoded = {"ids": 0}
    original = tokenizer.decode

    def counting(token_ids: list[int], **kwargs: Any) -> str:
        decoded["ids"] += len(token_ids)
        return str(original(token_ids, **kwargs))

    tokenizer.decode = counting
    detok = IncrementalText(tokenizer)
    for n in range(1, len(ids) + 1):
        detok.update(ids[:n])
    assert len(ids) > 500 and decoded["ids"] < 12 * len(ids)  # a full decode per token: ~n^2 / 2
