"""Prefix cache: the K/V of recent prompts, so a prompt that starts like an earlier one skips that part.

Task prompts share long heads (instructions, few-shot examples, system prompts); recomputing them for
every request is most of the prefill work for short inputs. After each prefill the prompt's K/V is kept
here (least recently used first out, within a byte budget); a new prompt looks for the kept prompt
sharing its longest common prefix and starts its forward after that many tokens. K/V of a token depends
only on the tokens before it, so the first `n` positions of any kept entry are valid for every prompt
whose first `n` tokens are the same.

Engine thread only: no locking.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

PrefillKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, H, P, D) keys and values

KEY_TOKENS = 8  # entries are indexed by their first tokens; shorter prompts are not kept


@dataclass
class Entry:
    tokens: torch.Tensor  # (P,) int64
    kv: PrefillKV
    nbytes: int


class PrefixCache:
    def __init__(self, budget_bytes: int, min_tokens: int = 16) -> None:
        self.budget_bytes = budget_bytes
        self.min_tokens = max(min_tokens, KEY_TOKENS)
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id -> entry, least recently used first
        self._by_head: dict[tuple[int, ...], set[int]] = {}
        self._next_id = 0
        self.nbytes = 0
        self.hit_tokens = 0  # prompt tokens served from here instead of computed

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def lookup(self, ids: list[int], keep_last: int = 1) -> tuple[int, PrefillKV | None]:
        """(n, K/V of ids[:n]) for the longest kept prefix, leaving at least `keep_last` tokens to compute.

        The K/V tensors are views of the kept entry: callers must not write into them.
        """
        limit = len(ids) - keep_last
        if not self.enabled or limit < self.min_tokens:
            return 0, None
        candidates = self._by_head.get(tuple(ids[:KEY_TOKENS]))
        if not candidates:
            return 0, None
        query = torch.tensor(ids[:limit])  # (limit,)
        best_id, best = -1, 0
        for entry_id in candidates:
            tokens = self._entries[entry_id].tokens
            m = min(limit, tokens.shape[0])
            differ = (tokens[:m] != query[:m]).nonzero()
            common = int(differ[0, 0]) if differ.numel() else m
            if common > best:
                best_id, best = entry_id, common
        if best < self.min_tokens:
            return 0, None
        self._entries.move_to_end(best_id)
        self.hit_tokens += best
        kv = [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_id].kv]
        return best, kv

    def store(self, ids: list[int], kv: PrefillKV) -> None:
        """Keep the K/V of a whole prompt. `kv` must be the prompt's own tensors, (1, H, len(ids), D) per
        layer, not views of a buffer that will be reused."""
        if not self.enabled or len(ids) < self.min_tokens:
            return
        nbytes = sum(k.nelement() * k.element_size() + v.nelement() * v.element_size() for k, v in kv)
        if nbytes > self.budget_bytes:
            return
        head = tuple(ids[:KEY_TOKENS])
        tokens = torch.tensor(ids)
        # An entry the new prompt extends (or repeats) is redundant: the new one covers it.
        for entry_id in list(self._by_head.get(head, ())):
            old = self._entries[entry_id].tokens
            if old.shape[0] <= tokens.shape[0] and torch.equal(old, tokens[: old.shape[0]]):
                self._remove(entry_id)
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = Entry(tokens, kv, nbytes)
        self._by_head.setdefault(head, set()).add(entry_id)
        self.nbytes += nbytes
        while self.nbytes > self.budget_bytes:
            self._remove(next(iter(self._entries)))

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.nbytes -= entry.nbytes
        head = tuple(entry.tokens[:KEY_TOKENS].tolist())
        ids = self._by_head[head]
        ids.discard(entry_id)
        if not ids:
            del self._by_head[head]
