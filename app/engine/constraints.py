"""Constrained generation: a row's next token restricted to what keeps its output inside a grammar.

A request may carry a Constraint (a JSON Schema, any JSON object, a regular expression, or a choice among
strings). It is compiled once per distinct constraint on the input thread (llguidance: a Rust parser over
the served tokenizer's vocabulary; chosen by measurement, docs/api.md "Constrained output"), and each sequence
gets its own matcher. Each step, the rows that have one get a token mask computed from their matcher alone,
applied to their own logits before any sampling control, so a constrained row never moves an unconstrained
one and a seeded draw stays batch-invariant. A row ends with "stop" when its grammar is complete.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from app.engine.errors import InvalidRequest
from app.engine.types import Constraint

log = logging.getLogger(__name__)

# Separators as json.dumps writes them, and no free whitespace: a small model given free whitespace can
# spend its whole budget on newlines.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
CACHED_GRAMMARS = 256  # compiled constraints kept (per schema text), least recently used out


class Guide:
    """One sequence's matcher: which tokens may come next, and whether the output is complete."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Consume a drawn token; False if the grammar rejects it (it cannot, under the mask) or is in error."""
        return bool(self.matcher.consume_token(token))

    @property
    def complete(self) -> bool:
        """Nothing but the end can follow: the output is a full match."""
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self.matcher.is_accepting())


class Grammars:
    """The served tokenizer seen by llguidance, and the compiled constraints (an LRU keyed by their text)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width: may exceed the tokenizer's (padded embeddings)
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, str] = OrderedDict()
        self._unavailable = ""  # why the library cannot read this tokenizer, once it was found so

    @property
    def tokenizer(self) -> Any:
        """The llguidance tokenizer, built on first use (about a second for a 50k vocabulary; at start-up when
        `prepare()` is called then)."""
        with self._lock:
            if self._unavailable:
                raise RuntimeError(self._unavailable)
            if self._tokenizer is None:
                import llguidance
                import llguidance.hf

                started = time.perf_counter()
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                                   eos_token=self.eos_token_ids or None)  # fmt: skip
                except Exception as exc:
                    self._unavailable = f"{type(exc).__name__}: {exc}"
                    raise
                log.info("constrained output ready: llguidance %s over %d tokens in %.1fs",
                         getattr(llguidance, "__version__", ""), self.vocab_size, time.perf_counter() - started)
            return self._tokenizer

    def prepare(self) -> bool:
        """Build the library's view of the tokenizer now (start-up): whether constrained output is available."""
        try:
            _ = self.tokenizer
            return True
        except Exception:  # a tokenizer llguidance cannot read: constrained requests will say so
            log.exception("constrained output unavailable for this tokenizer")
            return False

    def grammar(self, constraint: Constraint) -> str:
        """The constraint compiled (and checked against the vocabulary), or InvalidRequest naming its field."""
        import llguidance

        key = json.dumps([constraint.kind, constraint.value], sort_keys=True)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        M = llguidance.LLMatcher
        where = constraint.field
        try:
            tokenizer = self.tokenizer
        except Exception as exc:
            raise InvalidRequest(f"constrained output is not available for this model's tokenizer ({exc})",
                                 field=where) from None  # fmt: skip
        if constraint.kind == "json_schema":
            if not isinstance(constraint.value, dict):
                raise InvalidRequest("the JSON schema must be an object", field=where)
            try:
                grammar = M.grammar_from_json_schema(json.dumps(constraint.value), defaults=JSON_OPTIONS)  # type: ignore[arg-type]
            except (ValueError, TypeError) as exc:
                raise InvalidRequest(f"invalid JSON schema: {exc}", field=where) from None
        elif constraint.kind == "json_object":
            grammar = M.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        elif constraint.kind == "regex":
            pattern = constraint.value
            if not isinstance(pattern, str) or not pattern:
                raise InvalidRequest("the regular expression must be a non-empty string", field=where)
            grammar = M.grammar_from_regex(pattern)  # checked below, by the library's own (Rust) regex syntax
        elif constraint.kind == "choice":
            choices = constraint.value
            if (not isinstance(choices, list | tuple) or not choices
                    or not all(isinstance(c, str) and c for c in choices)):  # fmt: skip
                raise InvalidRequest("choice must be a non-empty list of non-empty strings", field=where)
            grammar = M.grammar_from_regex("|".join(re.escape(c) for c in choices))
        else:
            raise InvalidRequest(f"unknown constraint type {constraint.kind!r}", field=where)
        try:
            is_error, messages = M.validate_grammar_with_warnings(grammar, tokenizer)
        except Exception as exc:  # the library's own failure on an odd input: still the client's constraint
            is_error, messages = True, [f"{type(exc).__name__}: {exc}"]
        if is_error:
            raise InvalidRequest(_explain(constraint.kind, messages[0] if messages else ""), field=where)
        with self._lock:
            self._compiled[key] = grammar
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return grammar

    def guide(self, grammar: str) -> Guide:
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"the constraint cannot be used: {matcher.get_error()}", field="constraint")
        return Guide(matcher)

    def mask(self, logits: torch.Tensor, guides: Sequence[Guide | None]) -> torch.Tensor:
        """logits (R, V) with each guided row's disallowed tokens at -inf (a new tensor; unguided rows as they
        were). Each guided row's mask from its own matcher, one copy to the logits' device."""
        rows = [i for i, g in enumerate(guides) if g is not None]
        if not rows:
            return logits
        import llguidance.torch as llt

        bits = llt.allocate_token_bitmask(len(rows), self.vocab_size)  # (G, ceil(V / 32)) int32
        # one row after another: on 2 cores llguidance's parallel executor was slower at 32 rows (regex 6.8 vs
        # 2.5 ms a step, choice 5.5 vs 1.9; scripts/grammar_libraries.py)
        for j, i in enumerate(rows):
            llt.fill_next_token_bitmask(guides[i].matcher, bits, j)  # type: ignore[union-attr]
        allowed = unpack(bits.to(logits.device), logits.shape[-1])  # (G, V) bool
        if len(rows) == logits.shape[0]:
            return logits.masked_fill(~allowed, float("-inf"))
        idx = torch.tensor(rows, device=logits.device)
        out = logits.clone()
        out[idx] = out[idx].masked_fill(~allowed, float("-inf"))
        return out


def _explain(kind: str, message: str) -> str:
    """llguidance's error as one line: its first line and the regex parser's own "error:" line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = "; ".join(dict.fromkeys([*lines[:1], *(line for line in lines if line.startswith("error:"))]))
    what = {"json_schema": "JSON schema", "regex": "regular expression"}.get(kind, kind.replace("_", " "))
    if "Unimplemented" in message or "not supported" in message:
        return f"the {what} uses what constrained output does not support: {detail}"
    return f"invalid {what}: {detail or 'rejected by the grammar compiler'}"


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """(G, W) int32 bitmask (bit j of word w: token 32w + j) -> (G, vocab) bool."""
    shifts = _SHIFTS.get(bits.device)
    if shifts is None:
        shifts = _SHIFTS[bits.device] = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
