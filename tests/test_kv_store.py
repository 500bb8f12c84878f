"""KV store: refcounted segments, fork shares, join concatenates, the pool ends free (issue 3, deliverable 2)."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv_store import KVStore, OutOfSlots


class Node:
    """One context of a request's fork tree: a leaf decodes; an inner node waits for its children to join."""

    def __init__(self, ctx):
        self.ctx, self.children = ctx, None

    def all(self):
        yield self
        for c in self.children or ():
            yield from c.all()

    def leaves(self):
        return [n for n in self.all() if n.children is None]


class Model:
    """Drives a KVStore with admit / extend / fork / join / finish / preempt / abort, like the engine does."""

    def __init__(self, slots=256):
        self.kv = KVStore(num_layers=1, num_slots=slots, num_kv_heads=1, head_dim=1, allocate_tensors=False)
        self.running: list[tuple[Node, int]] = []  # (root, tokens it holds)
        self.waiting: list[int] = []  # preempted requests: tokens to re-prefill

    def contexts(self):
        return [n.ctx for root, _ in self.running for n in root.all()]

    def tokens(self, root):
        return sum(len(self.kv.slots[s]) for s in {s for n in root.all() for s in n.ctx})

    def _release(self, i):
        root, _ = self.running.pop(i)
        for n in root.all():
            self.kv.release(n.ctx)
        return root

    def _extend(self, ctx, n):
        try:
            self.kv.extend(ctx[-1], n)
            return True
        except OutOfSlots:
            return False

    def step(self, op, r):
        kv = self.kv
        if op == 0 or not self.running:  # admit (a new request, or a preempted one re-prefilled)
            n = self.waiting.pop(0) if self.waiting and r % 2 else 1 + r % 20
            root = Node([kv.new_segment()])
            if self._extend(root.ctx, n):
                self.running.append((root, n))
            else:
                kv.release(root.ctx)
                self.waiting.append(n)
            return
        i = r % len(self.running)
        root, _ = self.running[i]
        leaves = root.leaves()
        leaf = leaves[(r // 7) % len(leaves)]
        if op == 1:  # decode / extend a leaf; preempt the newest other request when the pool is short
            if not self._extend(leaf.ctx, 1 + r % 5) and len(self.running) > 1:
                j = len(self.running) - 1 if i != len(self.running) - 1 else 0
                victim = self._release(j)
                self.waiting.append(sum(1 for _ in victim.all()))
        elif op == 2:  # fork 1..5 children off a leaf
            leaf.children = [Node(c) for c in kv.fork(leaf.ctx, 1 + r % 5)]
            for c in leaf.children:
                self._extend(c.ctx, 1 + r % 3)
        elif op == 3:  # join a node whose children are all leaves
            ready = [n for n in root.all() if n.children and all(c.children is None for c in n.children)]
            if ready:
                n = ready[r % len(ready)]
                n.ctx = kv.join(n.ctx, [c.ctx for c in n.children])
                n.children = None
                self._extend(n.ctx, 1 + r % 3)
        elif op == 4:  # finish
            self._release(i)
        elif op == 5:  # preempt: free everything, re-queue its tokens for recompute
            root = self.running[i][0]
            n = self.tokens(root)
            self._release(i)
            self.waiting.append(max(1, n))
        elif op == 6:  # a step ahead's token given back (engine.llm.STEP_AHEAD): the leaf's last slot
            if kv.slots[leaf.ctx[-1]]:
                kv.shrink(leaf.ctx[-1], 1)
        else:  # abort
            self._release(i)

    def drain(self):
        while self.running:
            self._release(0)
        self.waiting.clear()


def test_fork_shares_and_join_concatenates():
    kv = KVStore(num_layers=2, num_slots=64, num_kv_heads=2, head_dim=4)
    trunk = [kv.new_segment()]
    kv.extend(trunk[0], 10)
    kids = kv.fork(trunk, 3)
    assert kv.refs[trunk[0]] == 4 and all(k[:1] == trunk for k in kids)
    for j, k in enumerate(kids):
        kv.extend(k[-1], j + 1)
    kv.check([trunk] + kids)
    before = kv.num_free
    joined = kv.join(trunk, kids)
    assert kv.num_free == before  # nothing copied
    assert kv.context_slots(joined[:-1]) == kv.context_slots(trunk) + sum((kv.slots[k[-1]] for k in kids), [])
    kv.check([joined])
    kv.release(joined)
    kv.check([])
    assert kv.num_free == 64


def test_errors_are_clean():
    kv = KVStore(num_layers=1, num_slots=4, num_kv_heads=1, head_dim=1, allocate_tensors=False)
    s = kv.new_segment()
    with pytest.raises(OutOfSlots):
        kv.extend(s, 5)
    assert kv.num_free == 4  # all or nothing
    kv.release([s])
    with pytest.raises(KeyError):
        kv.release([s])
    kv.check([])


def test_shrink_gives_the_last_slots_back_first():
    kv = KVStore(num_layers=1, num_slots=8, num_kv_heads=1, head_dim=1, allocate_tensors=False)
    a, b = kv.new_segment(), kv.new_segment()
    kv.extend(a, 3)
    given = kv.extend(b, 2)
    kv.shrink(b, 1)
    assert kv.slots[b] == given[:1] and kv.num_free == 4
    assert kv.extend(a, 1) == given[1:]  # handed out again first, as if never taken
    with pytest.raises(ValueError, match="holds 1 slots"):
        kv.shrink(b, 2)
    assert kv.slots[b] == given[:1]  # nothing changed
    kv.check([[a], [b]])


def test_extend_many_gives_the_slots_of_extend_one_by_one():
    rng = random.Random(0)
    one, many = (KVStore(num_layers=1, num_slots=512, num_kv_heads=1, head_dim=1, allocate_tensors=False)
                 for _ in range(2))
    sids = [(one.new_segment(), many.new_segment()) for _ in range(8)]
    for _ in range(20):
        grants = [(rng.randrange(len(sids)), rng.choice((1, 1, 1, rng.randrange(2, 6))))
                  for _ in range(rng.randrange(6))]
        for i, n in grants:
            one.extend(sids[i][0], n)
        many.extend_many([(sids[i][1], n) for i, n in grants])
        if rng.random() < 0.3:  # freed slots come back in the middle of the stack
            i = rng.randrange(len(sids))
            one.release([sids[i][0]])
            many.release([sids[i][1]])
            sids[i] = (one.new_segment(), many.new_segment())
    assert [one.slots[a] for a, _ in sids] == [many.slots[b] for _, b in sids] and one._free == many._free
    s = many.new_segment()
    with pytest.raises(OutOfSlots):
        many.extend_many([(s, 1), (s, many.num_free)])
    assert many.num_free == one.num_free and many.slots[s] == []  # all or nothing


def test_checker_catches_leak_and_double_ownership():
    kv = KVStore(num_layers=1, num_slots=8, num_kv_heads=1, head_dim=1, allocate_tensors=False)
    s = kv.new_segment()
    kv.extend(s, 2)
    kv._free.append(kv.slots[s][0])  # a slot both free and owned
    with pytest.raises(AssertionError):
        kv.check()
    kv._free.pop()
    kv.slots[s].pop()  # a leaked slot
    with pytest.raises(AssertionError):
        kv.check()


def test_10k_random_ops_keep_the_invariant():
    rng = random.Random(0)
    m = Model(slots=256)
    for _ in range(10_000):
        m.step(rng.randrange(8), rng.randrange(1 << 30))
        m.kv.check(m.contexts())
    m.drain()
    m.kv.check([])
    assert m.kv.num_free == 256 and not m.kv.refs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 1 << 30)), max_size=300),
       st.integers(16, 200))
def test_random_op_sequences_keep_the_invariant(ops, slots):
    m = Model(slots=slots)
    for op, r in ops:
        m.step(op, r)
        m.kv.check(m.contexts())
    m.drain()
    m.kv.check([])
    assert m.kv.num_free == slots
