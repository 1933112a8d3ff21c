"""Which constrained-decoding library: llguidance, xgrammar and outlines-core measured side by side.

    .venv/bin/pip install --no-deps llguidance xgrammar apache-tvm-ffi outlines-core   # only for this script
    .venv/bin/python scripts/grammar_libraries.py [--rows 32] [--models tiny-gpt2,smollm2-135m-instruct,gemma-3-270m]

Per served tokenizer (GPT-2 BPE, SmolLM2, Gemma) and per library: tokenizer set-up time; per constraint (a
nested JSON schema, an ISO-date regex, a choice): compile time, and the time to fill one step's token mask
along a valid answer, at 1 row and at --rows rows (each row its own matcher, as a batch would hold them);
the answers' tokens are fed back so every library walks the same path. RSS growth per library is printed
at the end. Prints figures; asserts nothing (a library that rejects a constraint prints its error).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
        "status": {"enum": ["active", "inactive"]},
    },
    "required": ["name", "age", "status"],
}  # fmt: skip
SCHEMA_ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"],
                            "address": {"city": "London", "zip": "W1"}, "status": "active"})  # fmt: skip
DATE = r"\d{4}-\d{2}-\d{2}"
DATE_ANSWER = "2024-02-29"
CHOICES = ["positive", "negative", "neutral"]
CHOICE_ANSWER = "negative"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


class Llguidance:
    name = "llguidance"

    def __init__(self, tok: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.vocab = vocab
        self.executor = llguidance.LLExecutor()

    def compile(self, kind: str, spec: Any) -> Any:
        M = self.ll.LLMatcher
        options = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}  # as json.dumps
        grammar = {"json": lambda: M.grammar_from_json_schema(json.dumps(spec), defaults=options),  # type: ignore[arg-type]
                   "regex": lambda: M.grammar_from_regex(spec),
                   "choice": lambda: M.grammar_from_regex("|".join(re.escape(c) for c in spec))}[kind]()  # fmt: skip
        is_error, messages = M.validate_grammar_with_warnings(grammar, self.tok)
        if is_error:
            raise ValueError(messages[0])
        return grammar

    def matcher(self, grammar: Any) -> Any:
        return self.ll.LLMatcher(self.tok, grammar, log_level=0)

    def mask(self, rows: int) -> torch.Tensor:
        return self.llt.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matchers: list[Any], mask: torch.Tensor) -> None:
        if len(matchers) == 1:
            self.llt.fill_next_token_bitmask(matchers[0], mask, 0)
        else:
            self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], mask)

    def accept(self, m: Any, token: int) -> bool:
        return bool(m.consume_token(token))


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok: Any, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self.vocab = vocab

    def compile(self, kind: str, spec: Any) -> Any:
        c = self.compiler
        if kind == "json":
            return c.compile_json_schema(json.dumps(spec), any_whitespace=False)
        regex = spec if kind == "regex" else "|".join(re.escape(s) for s in spec)
        return c.compile_grammar(self.xgr.Grammar.from_regex(regex))

    def matcher(self, grammar: Any) -> Any:
        return self.xgr.GrammarMatcher(grammar)

    def mask(self, rows: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matchers: list[Any], mask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, i)

    def accept(self, m: Any, token: int) -> bool:
        return bool(m.accept_token(token))


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: Any, vocab: int) -> None:
        import outlines_core

        self.oc = outlines_core
        eos = tok.eos_token_id
        pieces: dict[str, list[int]] = {}
        for token, i in tok.get_vocab().items():  # outlines-core wants each token's text, not its BPE spelling
            if i == eos or i >= vocab:
                continue
            text = tok.convert_tokens_to_string([token])
            if text and "\ufffd" not in text:
                pieces.setdefault(text, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, pieces)
        self.vocab = vocab

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "json":
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(spec))
        else:
            regex = spec if kind == "regex" else "|".join(re.escape(s) for s in spec)
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, index: Any) -> Any:
        return self.oc.Guide(index)

    def mask(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, (self.vocab + 31) // 32, dtype=torch.int32)

    def fill(self, matchers: list[Any], mask: torch.Tensor) -> None:
        for i, g in enumerate(matchers):
            row = mask[i]
            g.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def accept(self, g: Any, token: int) -> bool:
        g.advance(token)
        return True


def walk(lib: Any, grammar: Any, answer: list[int], rows: int) -> float:
    """Mean seconds to fill one step's mask for `rows` matchers, along `answer`."""
    matchers = [lib.matcher(grammar) for _ in range(rows)]
    mask = lib.mask(rows)
    times = []
    for token in answer:
        started = time.perf_counter()
        lib.fill(matchers, mask)
        times.append(time.perf_counter() - started)
        allowed = bool((mask[0, token // 32] >> (token % 32)) & 1)
        if not allowed:
            raise ValueError(f"token {token} of the answer is masked out")
        for m in matchers:
            lib.accept(m, token)
    return statistics.mean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-gpt2,smollm2-135m-instruct,gemma-3-270m")
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--libraries", default="llguidance,xgrammar,outlines-core")
    args = parser.parse_args()
    torch.set_num_threads(2)
    libraries = {c.name: c for c in (Llguidance, Xgrammar, OutlinesCore)}
    constraints = {"json": (SCHEMA, SCHEMA_ANSWER), "regex": (DATE, DATE_ANSWER), "choice": (CHOICES, CHOICE_ANSWER)}
    print(f"{'tokenizer':22} {'library':14} {'setup s':>8} {'constraint':10} {'compile ms':>10} "
          f"{'mask ms/step 1 row':>18} {f'{args.rows} rows':>9}  RSS +MB")  # fmt: skip
    for model in args.models.split(","):
        tok = AutoTokenizer.from_pretrained(args.store / model)
        vocab = len(tok)
        for name in args.libraries.split(","):
            before = rss_mb()
            lib, setup = timed(lambda: libraries[name](tok, vocab))  # noqa: B023
            for kind, (spec, answer_text) in constraints.items():
                answer = tok.encode(answer_text, add_special_tokens=False)
                try:
                    grammar, compile_s = timed(lambda: lib.compile(kind, spec))  # noqa: B023
                    one = walk(lib, grammar, answer, 1)
                    many = walk(lib, grammar, answer, args.rows)
                    cells = f"{1000 * compile_s:10.1f} {1000 * one:18.3f} {1000 * many:9.3f}"
                except Exception as exc:  # a library that cannot do it says so
                    cells = f"failed: {str(exc).splitlines()[0][:60]}"
                print(f"{model:22} {name:14} {setup:8.2f} {kind:10} {cells}  {rss_mb() - before:6.0f}", flush=True)


if __name__ == "__main__":
    main()
