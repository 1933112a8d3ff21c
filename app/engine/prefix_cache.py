"""Prefix cache: the K/V of recent prompts, so a prompt that starts like an earlier one skips that part.

Task prompts share long heads (instructions, few-shot examples, system prompts); recomputing them for
every request is most of the prefill work for short inputs. After each prefill the prompt's K/V is kept
here (least recently used first out); a new prompt looks for the kept prompt sharing its longest common
prefix and starts its forward after that many tokens. K/V of a token depends only on the tokens before
it, so the first `n` positions of any kept entry are valid for every prompt whose first `n` tokens are
the same.

Memory: the whole budget is one pool per layer, allocated and touched when the engine starts, cut into
blocks of BLOCK_TOKENS tokens; an entry holds a list of blocks. The cache never allocates after that, so
it costs its full budget from the start rather than creeping up to it over hours of traffic, and kept
prompts of every length do not fragment the heap as they come and go.

Engine thread only: no locking.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from app.engine.kv_cache import BLOCK

PrefillKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, H, P, D) keys and values

KEY_TOKENS = 8  # entries are indexed by their first tokens; shorter prompts are not kept
BLOCK_TOKENS = BLOCK  # pool granularity, the KV cache's block: an entry wastes at most BLOCK_TOKENS - 1 tokens of it


@dataclass
class Entry:
    tokens: torch.Tensor  # (P,) int64
    blocks: list[int]
    slots: torch.Tensor  # (P,) int64: the pool row of each token


@dataclass
class Hit:
    """A kept prefix of `length` tokens: where its K/V sit in the pool."""

    length: int
    slots: torch.Tensor  # (n,) int64 pool rows
    pool: PrefillKV  # per layer (rows, H, D)

    def gather(self) -> PrefillKV:
        """A copy, (1, H, n, D) per layer."""
        return [(self._rows(k), self._rows(v)) for k, v in self.pool]

    def _rows(self, pool: torch.Tensor) -> torch.Tensor:
        return pool.index_select(0, self.slots).permute(1, 0, 2).unsqueeze(0)  # (n, H, D) -> (1, H, n, D)


class PrefixCache:
    def __init__(self, budget_bytes: int, min_tokens: int = 16, block_tokens: int = BLOCK_TOKENS) -> None:
        self.budget_bytes = budget_bytes
        self.min_tokens = max(min_tokens, KEY_TOKENS)
        self.block_tokens = block_tokens
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id -> entry, least recently used first
        self._by_head: dict[tuple[int, ...], set[int]] = {}
        self._next_id = 0
        # per layer (keys, values), each (blocks * block_tokens, H, D): token rows, grouped in blocks
        self._pool: PrefillKV | None = None
        self._free: list[int] = []
        self._block_bytes = 0
        self.hit_tokens = 0  # prompt tokens served from here instead of computed

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def blocks(self) -> int:
        return 0 if self._pool is None else self._pool[0][0].shape[0] // self.block_tokens

    @property
    def nbytes(self) -> int:
        """Bytes of the pool that kept prompts occupy."""
        return (self.blocks - len(self._free)) * self._block_bytes

    @property
    def capacity_bytes(self) -> int:
        """Bytes the pool holds (allocated once: `reserve`, or else the first `store`)."""
        return self.blocks * self._block_bytes

    def reserve(self, like: PrefillKV) -> None:
        """Allocate the pool, shaped like `like` ((1, H, P, D) per layer), unless it exists. Zero-filled, so
        its pages are resident from now on and memory does not grow later."""
        if self._pool is not None or not self.enabled:
            return
        per_token = sum(k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size()
                        for k, v in like)  # fmt: skip
        blocks = self.budget_bytes // (per_token * self.block_tokens)
        if blocks == 0:
            self.budget_bytes = 0  # not even one block fits: off
            return
        rows = blocks * self.block_tokens
        self._pool = [
            (k.new_zeros(rows, k.shape[1], k.shape[3]), v.new_zeros(rows, v.shape[1], v.shape[3])) for k, v in like
        ]
        self._free = list(range(blocks - 1, -1, -1))  # a stack: low blocks first
        self._block_bytes = per_token * self.block_tokens

    def lookup(self, ids: list[int], keep_last: int = 1) -> tuple[int, PrefillKV | None]:
        """(n, K/V of ids[:n]) for the longest kept prefix, leaving at least `keep_last` tokens to compute.

        The K/V tensors are copies gathered out of the pool, (1, H, n, D) per layer."""
        hit = self.match(ids, keep_last)
        return (0, None) if hit is None else (hit.length, hit.gather())

    def match(self, ids: list[int], keep_last: int = 1) -> Hit | None:
        """The longest kept prefix of `ids`, leaving at least `keep_last` tokens to compute; valid until the
        next `store`."""
        limit = len(ids) - keep_last
        if not self.enabled or limit < self.min_tokens:
            return None
        candidates = self._by_head.get(tuple(ids[:KEY_TOKENS]))
        if not candidates:
            return None
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
            return None
        self._entries.move_to_end(best_id)
        self.hit_tokens += best
        assert self._pool is not None
        return Hit(best, self._entries[best_id].slots[:best], self._pool)

    def store(self, ids: list[int], kv: PrefillKV) -> None:
        """Keep the K/V of a whole prompt, (1, H, len(ids), D) per layer (copied into the pool)."""
        self.reserve(kv)
        if not self.enabled or len(ids) < self.min_tokens:
            return
        need = -(-len(ids) // self.block_tokens)
        if need > self.blocks:
            return
        head = tuple(ids[:KEY_TOKENS])
        tokens = torch.tensor(ids)
        # An entry the new prompt extends (or repeats) is redundant: the new one covers it.
        for entry_id in list(self._by_head.get(head, ())):
            old = self._entries[entry_id].tokens
            if old.shape[0] <= tokens.shape[0] and torch.equal(old, tokens[: old.shape[0]]):
                self._remove(entry_id)
        while len(self._free) < need:
            self._remove(next(iter(self._entries)))
        assert self._pool is not None
        device = self._pool[0][0].device  # the pool's: its index tensors must live there too (CUDA)
        blocks = self._free[: -need - 1 : -1]  # the stack's top `need`, in pop order
        offsets = torch.arange(self.block_tokens, device=device)
        slots = (torch.tensor(blocks, device=device).unsqueeze(1) * self.block_tokens
                 + offsets).flatten()[: len(ids)]  # (P,)  # fmt: skip
        for (pool_k, pool_v), (k, v) in zip(self._pool, kv, strict=True):
            pool_k.index_copy_(0, slots, k[0].transpose(0, 1))  # (H, P, D) -> (P, H, D) rows
            pool_v.index_copy_(0, slots, v[0].transpose(0, 1))
        del self._free[-need:]  # taken once the copy succeeded: a failed one leaks no blocks
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = Entry(tokens, blocks, slots)
        self._by_head.setdefault(head, set()).add(entry_id)

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self._free.extend(entry.blocks)
        head = tuple(entry.tokens[:KEY_TOKENS].tolist())
        ids = self._by_head[head]
        ids.discard(entry_id)
        if not ids:
            del self._by_head[head]
