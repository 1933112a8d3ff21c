"""The constraint stage alone: bit unpacking, per-row masks, compiled-grammar cache, unusable tokenizers."""

from __future__ import annotations

import pytest
import torch

from app.engine import constraints
from app.engine.constraints import Grammars, unpack
from app.engine.errors import InvalidRequest
from app.engine.types import Constraint
from app.models.loading.loader import LoadedModel


def test_unpack_reads_bit_j_of_word_w_as_token_32w_plus_j() -> None:
    allowed = {0, 5, 31, 32, 63, 64, 70}
    bits = torch.zeros(1, 3, dtype=torch.int32)
    for t in allowed:
        word = int(bits[0, t // 32]) | (1 << (t % 32))
        bits[0, t // 32] = word - 2**32 if word >= 2**31 else word  # bit 31 is the int32 sign bit
    got = unpack(bits, 71)
    assert got.shape == (1, 71) and set(torch.nonzero(got[0]).flatten().tolist()) == allowed


def test_masks_touch_only_their_own_rows(tiny: LoadedModel) -> None:
    grammars = Grammars(tiny.tokenizer, int(tiny.model.config.vocab_size), tiny.info.eos_token_ids)
    grammar = grammars.grammar(Constraint("choice", ["yes", "no"]))
    logits = torch.randn(3, grammars.vocab_size)  # (3, V)
    out = grammars.mask(logits, [None, grammars.guide(grammar), None])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    finite = torch.nonzero(torch.isfinite(out[1])).flatten().tolist()
    starts = {tiny.tokenizer.encode(w)[0] for w in ("yes", "no")}
    assert starts <= set(finite) and len(finite) < 20  # the choices' first tokens, and few others
    assert torch.equal(out[1][finite], logits[1][finite])  # allowed logits unchanged
    assert grammars.mask(logits, [None, None, None]) is logits  # nothing constrained: no copy


def test_compiled_constraints_are_cached_by_their_text(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constraints, "CACHED_GRAMMARS", 2)
    grammars = Grammars(tiny.tokenizer, int(tiny.model.config.vocab_size), tiny.info.eos_token_ids)
    a = grammars.grammar(Constraint("json_schema", {"type": "object", "properties": {"a": {"type": "integer"}}}))
    same = {"properties": {"a": {"type": "integer"}}, "type": "object"}  # the same schema, keys in another order
    assert grammars.grammar(Constraint("json_schema", same)) is a
    grammars.grammar(Constraint("regex", "[0-9]+"))
    grammars.grammar(Constraint("regex", "[a-z]+"))
    assert len(grammars._compiled) == 2  # the least recently used went


def test_a_tokenizer_the_library_cannot_read_is_a_clear_error_not_a_crash() -> None:
    class SlowTokenizer:  # not a "fast" (Rust) tokenizer
        eos_token_id = 0

    grammars = Grammars(SlowTokenizer(), 100, [0])
    assert grammars.prepare() is False
    with pytest.raises(InvalidRequest) as bad:
        grammars.grammar(Constraint("regex", "a+", field="constraint.pattern"))
    assert bad.value.field == "constraint.pattern" and "not available" in bad.value.message
