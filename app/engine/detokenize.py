"""Incremental detokenization: a sequence's text as its tokens arrive, decoding a few tokens per step.

Decoding the whole sequence after every token costs O(n) per token, O(n^2) per sequence, on the engine's
thread (a 2,000-token answer decodes ~2 million token ids). As TGI and vLLM do, each step decodes only
a short window: the tokens since `prefix` (kept for context: a SentencePiece decoder drops the leading
space of a call's first token, byte-level BPE splits characters across tokens) with and without the new
ones; the difference is the new text. While that difference ends in U+FFFD the new tokens end inside a
multi-byte character: the offsets wait for the rest of it.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalText:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix = 0  # first token of the context window the next decode starts at
        self.read = 0  # tokens whose text is in `text`

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def update(self, tokens: list[int], final: bool = False) -> str:
        """The text of all of `tokens` (the previous call's plus the new ones at the end). `final`: the sequence
        has ended, so what is held back (an unfinished character) comes out too."""
        before = self._decode(tokens[self.prefix : self.read])
        after = self._decode(tokens[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(tokens)
        return self.text

    def final(self, tokens: list[int]) -> str:
        return self.update(tokens, final=True)
