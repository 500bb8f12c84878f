"""KV store: token-granular slots (page size 1) in one preallocated K and V tensor per layer.

A *segment* is a refcounted, growable list of slot indices. A sequence's context is an ordered list of
segment ids, and it holds one reference on each. Fork = every child takes a reference on the parent's
segments and gets a fresh segment of its own; join = the continuing sequence's context is the parent's plus
each child's own segments. Nothing is copied and nothing is re-prefilled: RoPE is applied before K is stored,
so the positions live in the cache. A segment's slots go back to the pool when its refcount drops to 0.
"""
from __future__ import annotations

from collections import Counter

import torch


class OutOfSlots(RuntimeError):
    """The pool cannot hold the requested tokens (the scheduler answers with preemption)."""


class KVStore:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu", allocate_tensors: bool = True):
        self.num_slots = num_slots
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        # allocate_tensors=False: bookkeeping only (property tests of the allocator)
        self.k = torch.zeros(shape, dtype=dtype, device=device) if allocate_tensors else None
        self.v = torch.zeros(shape, dtype=dtype, device=device) if allocate_tensors else None
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # a stack: low slots first
        self.slots: dict[int, list[int]] = {}  # segment id -> its slots, in token order
        self.refs: dict[int, int] = {}  # segment id -> refcount
        self._next_id = 0

    # pool -------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def new_segment(self) -> int:
        """A new empty segment with refcount 1 (the caller's reference)."""
        sid = self._next_id
        self._next_id += 1
        self.slots[sid] = []
        self.refs[sid] = 1
        return sid

    def extend(self, sid: int, n: int) -> list[int]:
        """Give segment `sid` n more slots (all or nothing) and return them."""
        self.extend_many([(sid, n)])
        return self.slots[sid][len(self.slots[sid]) - n:]

    def extend_many(self, grants: list[tuple[int, int]]) -> None:
        """Segment sid gets n more slots for each (sid, n), in order, in one pass over the pool (all or nothing):
        the same slots as one `extend` per grant, popped from the end of the free stack."""
        free = self._free
        need = sum(n for _, n in grants)
        if need > len(free):
            raise OutOfSlots(f"need {need} KV slots, {len(free)} free of {self.num_slots}")
        new = free[len(free) - need:]
        del free[len(free) - need:]
        new.reverse()  # the order one pop at a time from the end of the stack would give
        slots, i = self.slots, 0
        for sid, n in grants:
            if n == 1:
                slots[sid].append(new[i])
            else:
                slots[sid].extend(new[i:i + n])
            i += n

    def shrink(self, sid: int, n: int) -> None:
        """Give the last n slots of segment `sid` back to the pool (they are handed out first again)."""
        slots = self.slots[sid]
        if not 0 <= n <= len(slots):
            raise ValueError(f"segment {sid} holds {len(slots)} slots, cannot give back {n}")
        self._free.extend(reversed(slots[len(slots) - n:]))
        del slots[len(slots) - n:]

    def share(self, sids) -> None:
        for sid in sids:
            if self.refs.get(sid, 0) <= 0:
                raise KeyError(f"segment {sid} is not live")
            self.refs[sid] += 1

    def release(self, sids) -> None:
        for sid in sids:
            r = self.refs.get(sid, 0)
            if r <= 0:
                raise KeyError(f"segment {sid} released more often than referenced")
            if r == 1:
                self._free.extend(reversed(self.slots.pop(sid)))
                del self.refs[sid]
            else:
                self.refs[sid] = r - 1

    def context_slots(self, sids) -> list[int]:
        out: list[int] = []
        for sid in sids:
            out.extend(self.slots[sid])
        return out

    # fork / join on contexts (lists of segment ids, one reference each) -------------------------
    def fork(self, ctx: list[int], n: int) -> list[list[int]]:
        """n child contexts: the parent's segments (shared, refcount += 1 each) plus a fresh segment."""
        children = []
        for _ in range(n):
            self.share(ctx)
            children.append(ctx + [self.new_segment()])
        return children

    def join(self, parent: list[int], children: list[list[int]]) -> list[int]:
        """The context after a join: the parent's segments, then each child's own ones, then a fresh segment.
        The parent's and the children's own references move to the result; the children's shared ones drop."""
        out = list(parent)
        k = len(parent)
        for child in children:
            if child[:k] != parent:
                raise ValueError("a child context does not extend its parent's")
            self.release(child[:k])
            out.extend(child[k:])
        out.append(self.new_segment())
        return out

    # invariant --------------------------------------------------------------------------------
    def check(self, contexts=None) -> None:
        """Every slot is free xor owned by exactly one live segment; refcounts are positive and, when the
        live contexts are given, equal the number of references they hold."""
        seen = Counter(self._free)
        for sid, sl in self.slots.items():
            seen.update(sl)
        dup = [s for s, c in seen.items() if c != 1]
        assert not dup, f"slots owned twice or free and owned: {dup[:10]}"
        assert len(seen) == self.num_slots and all(0 <= s < self.num_slots for s in seen), \
            f"leaked slots: {self.num_slots - len(seen)}"
        assert set(self.slots) == set(self.refs), "segments without refcount or refcount without slots"
        assert all(r > 0 for r in self.refs.values()), "non-positive refcount"
        if contexts is not None:
            expected = Counter(sid for ctx in contexts for sid in ctx)
            assert dict(expected) == self.refs, f"refcounts {self.refs} != live references {dict(expected)}"
