"""Continuous batching over the live branches of every request, with preemption by recompute.

Each forward is a list of `Item`s: "extend logical segment s of request r by its next n uncached tokens".
A decode is an item of one token (the branch's last sampled token); a forced header (`\\n<step>\\nK:`,
`\\n<takeaway>\\n`) or a prompt chunk is an item of several; all of them share one forward, decodes first.
An item may run once every segment it sees is cached or completed in the same forward (the eager attention
backends write all K/V of a layer before any query of that layer attends); with `split_headers` (CUDA graphs,
whose attention writes and reads in one launch) only once they are cached.

When the pool is short the newest running request is preempted: its KV references are dropped and it goes
back to the head of the queue with all its tokens, which are re-prefilled (recomputed) when it is admitted
again. A request too long for the whole pool ends with finish reason `length`; nothing raises.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.kv_store import KVStore
from engine.npr_state import Branch, Request


@dataclass(slots=True)
class Item:
    req: Request
    seg: int
    start: int  # first token (index in the segment) of this item
    n: int
    sample: Branch | None = None  # the branch to sample for from this item's last token
    kvs: tuple[int, ...] = ()  # KV segments of its context, in order: the ancestors' (ascending), its own last
    length: int = 0  # context slots, its own tokens included

    def context(self, kv: KVStore) -> list[int]:
        """The context's slots, this item's tokens last (built on demand: O(context))."""
        return kv.context_slots(self.kvs[:-1]) + kv.slots[self.kvs[-1]][:self.start + self.n]


def independent(items: list[Item]) -> bool:
    """No item sees a segment that this forward extends (items of one forward, their `kvs` assigned): then an
    attention launch may write the forward's K/V while it reads the cache (the fused KV write)."""
    written = {it.kvs[-1] for it in items}
    return all(written.isdisjoint(it.kvs[:-1]) for it in items)


class Scheduler:
    """split_headers > 0 (the engine with CUDA graphs): a forward whose only several-token items are forced
    headers of at most that many tokens takes them one token per item instead (the header's branch then needs
    a forward per header token), so that it stays a decode-only forward that a CUDA graph can run; a prompt
    chunk (or a recompute) keeps the forward eager and takes its headers whole."""

    def __init__(self, kv: KVStore, max_batch_tokens: int, split_headers: int = 0, max_running: int = 0):
        if max_running < 0:
            raise ValueError(f"max_running must be >= 0 (0: no limit), got {max_running}")
        self.kv, self.max_batch_tokens, self.split_headers = kv, max_batch_tokens, split_headers
        # at most max_running requests resident; once full, admit again only when a quarter of it is free, so
        # that prompts enter in groups (each admission makes a forward eager: its prompt chunk)
        self.max_running, self.admit_group = max_running, max(1, max_running // 4)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        (self.finished if req.finish_reason else self.waiting).append(req)

    def done(self) -> bool:
        return not self.waiting and not self.running

    # admission and preemption ------------------------------------------------------------------
    def window_open(self) -> bool:
        """Whether waiting requests may enter now as far as `max_running` goes (the KV pool may still say no)."""
        if not self.waiting:
            return False
        if not self.max_running:
            return True
        free = self.max_running - len(self.running)
        return free >= min(self.admit_group, len(self.waiting)) or not self.running

    def _admit(self) -> None:
        if not self.window_open():
            return
        # room for every running branch's next token, then the whole of the new request
        reserve = sum(len(r.live()) for r in self.running)
        while self.waiting and (not self.max_running or len(self.running) < self.max_running):
            req = self.waiting[0]
            need = sum(len(s.tokens) for s in req.segs) + len(req.live())
            if self.running and self.kv.num_free - reserve < need:
                break
            self.waiting.popleft()
            req.attach(self.kv)
            self.running.append(req)
            reserve += len(req.live())

    def preempt(self, req: Request) -> None:
        req.detach()
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def retire(self) -> None:
        """Move finished requests out, dropping their KV."""
        for req in [r for r in self.running if r.finish_reason]:
            req.detach()
            self.running.remove(req)
            self.finished.append(req)

    # one forward ------------------------------------------------------------------------------
    def schedule(self) -> list[Item]:
        self.retire()
        self._admit()
        while True:
            items, need = self._plan()
            if need <= self.kv.num_free:
                break
            victim = self.running[-1]
            if len(self.running) == 1:  # alone and still too long for the pool
                victim.finish("length")
                self.retire()
                return self.schedule() if not self.done() else []
            self.preempt(victim)
        grants = []
        for it in items:  # allocate, then count each item's context (an ancestor may grow in this forward)
            req, n = it.req, it.n
            kvs = it.kvs = req.kv_chain(it.seg)
            grants.append((kvs[-1], n))
            req.segs[it.seg].cached += n
        self.kv.extend_many(grants)
        slots = self.kv.slots
        for it in items:
            length = it.start + it.n
            for k in it.kvs[:-1]:
                length += len(slots[k])
            it.length = length
        return items

    def _plan(self) -> tuple[list[Item], int]:
        """The items of the next forward and how many tokens they add."""
        budget = self.max_batch_tokens
        items: list[Item] = []
        planned: dict[tuple[int, int], int] = {}  # (rid, seg) -> tokens planned

        add = items.append
        for req in self.running:  # decodes first: one token per live branch whose context is all cached
            segs, ancestors, rid = req.segs, req.ancestors, req.rid
            for b in req.live():
                s = b.seg
                seg = segs[s]
                start = seg.cached
                if budget > 0 and len(seg.tokens) - start == 1:
                    for a in ancestors(s):
                        if a.cached < len(a.tokens):
                            break
                    else:
                        add(Item(req, s, start, 1, b))
                        planned[rid, s] = 1
                        budget -= 1
        if budget <= 0:
            return items, self.max_batch_tokens - budget
        extends, left_budget = self._extends(dict(planned) if self.split_headers else planned, budget, None)
        if self.split_headers and any(it.n > 1 for it in extends) and all(
                it.n <= self.split_headers and (it.seg or it.start >= it.req.prompt_len) for it in extends):
            extends, left_budget = self._extends(planned, budget, 1)
        return items + extends, self.max_batch_tokens - left_budget

    def _extends(self, planned: dict[tuple[int, int], int], budget: int, cap: int | None
                 ) -> tuple[list[Item], int]:
        """Forced headers, `</step>`s and prompt chunks after the decodes, in segment order (at most `cap`
        tokens each); returns them and the budget left."""
        items = []
        for req in self.running:
            for s, seg in enumerate(req.segs):
                left = len(seg.tokens) - seg.cached
                if left > 0 and (req.rid, s) not in planned and self._ready(req, s, planned, self.split_headers):
                    n = min(left, budget, cap or left)
                    it = Item(req, s, seg.cached, n)
                    if seg.cached + n == len(seg.tokens):
                        it.sample = next((b for b in req.live() if b.seg == s), None)
                    items.append(it)
                    planned[(req.rid, s)] = n
                    budget -= n
                    if budget <= 0:
                        return items, budget
        return items, budget

    @staticmethod
    def _ready(req: Request, s: int, planned: dict[tuple[int, int], int], cached_only: bool = False) -> bool:
        """Every segment s sees but itself is cached or completed by the items planned so far (cached_only:
        cached before this forward, as a CUDA-graph step needs: its attention writes each row's new K/V in
        the same launch that other rows read the cache, so no row may see another row's new token)."""
        for a in req._closure(s):
            seg = req.segs[a]
            if a != s and seg.cached + (0 if cached_only else planned.get((req.rid, a), 0)) < len(seg.tokens):
                return False
        return True
