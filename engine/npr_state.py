"""Per-request NPR state machine: the fork/join tree of logical segments and its live branches.

A `Request` owns logical segments (`Seg`: tokens, positions, logprobs, parents, and the KV segment that
holds them) and branches (`Branch`: the trunk or one step, decoding at the end of its current segment).
It follows `npr_async.structure.parse_structure` token by token, so the positions and segments it produces
are the ones that function computes on the output ids:
- a sampled `</guideline>` (depth < max_depth) runs the pre-branch validator, then forks one child per plan,
  each opening a new step segment with the forced header `\\n<step>\\nK:`; children see the trunk's KV;
- a step ends at `</step>` (sampled, or forced when `max_step_tokens` is reached);
- when every sibling has closed its step the parent goes on in a join segment that opens with the forced
  `\\n<takeaway>\\n`, sees the trunk and all steps, and starts after the longest step.
The tree's data types (`Seg`, `Fork`, `Branch`) live in engine/npr_tree.py.
KV references: a branch holds one reference on the KV segment of every logical segment it sees (its
`ctx`), waiting and finished branches included; see `KVStore.fork` / `KVStore.join`.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.npr_tree import Branch, Fork, Seg  # also re-exported: scheduler imports Branch from here
from npr_async.structure import parse_structure
from npr_async.tags import TagIds


@dataclass(frozen=True)
class Limits:
    """The budgets of one request (SamplingParams resolved against EngineConfig)."""
    max_total_tokens: int  # generated tokens, all branches counted
    max_path_tokens: int  # generated tokens on the critical path (bounds positions)
    max_step_tokens: int  # per step, its header and `</step>` included
    max_plans: int
    max_depth: int = 5
    fork_margin_tokens: int = 0
    parallel: bool = True


class Request:
    def __init__(self, rid: int, prompt: list[int], limits: Limits, tags: TagIds, eos: set[int],
                 headers: dict, params=None):
        self.rid, self.limits, self.params, self.tags, self.eos = rid, limits, params, tags, eos
        self._reacts = frozenset(eos) | tags.all  # tokens that may take a transition beyond the budget checks
        self.headers = headers  # "step": k -> ids, "join": ids (pre-tokenised, shared by all requests)
        self.max_depth = limits.max_depth if limits.parallel else 0
        self.prompt_len = len(prompt)
        self.finish_reason: str | None = None
        self.no_fork_at: list[tuple[int, int]] = []  # (seg, offset) of suppressed `</guideline>`s
        self.num_forks = self.num_branches = self.generated = 0
        self.branches: list[Branch] = []
        self.kv = None  # the KVStore while resident
        self._closures: dict[int, list[int]] = {}
        self._ancestors: dict[int, list[Seg]] = {}
        self._kv_chains: dict[int, tuple[int, ...]] = {}  # valid while resident: attach / detach clear it
        self._from_prefix(prompt)

    # construction from any prefix ---------------------------------------------------------------
    def _from_prefix(self, prompt: list[int]) -> None:
        s = parse_structure(prompt, self.tags, max_depth=self.max_depth)
        self.segs = [Seg(list(p)) for p in s.parents]
        for t, sg, pos in zip(prompt, s.segment_ids.tolist(), s.positions.tolist()):
            seg = self.segs[sg]
            seg.tokens.append(t)
            seg.positions.append(pos)
            seg.logprobs.append(float("nan"))
        for i, seg in enumerate(self.segs[1:], 1):
            self.segs[seg.parents[0]].follows.append(i)
        self.path_start = int(s.positions.max()) + 1 if len(prompt) else 0
        cur = int(s.segment_ids[-1]) if len(prompt) else 0
        parent = self._add_branch(Branch(s.open_forks[0].fork_segment if s.open_forks else cur, [], 0))
        frames = []
        for of in s.open_forks:  # outermost first: rebuild each open fork around its parent branch
            parent.state = "wait"
            fork = parent.forked = Fork(parent, of.fork_segment, of.base_position,
                                        self._count_plans(of.fork_segment) or 0)
            frames.append(fork)
            self.num_forks += 1
            for sg in of.step_segments:  # finished steps
                fork.children.append(self._add_branch(Branch(sg, [], 0, fork, state="done")))
            if of.current_segment is not None:  # the step being written where the prefix ends
                parent = self._add_branch(Branch(of.current_segment, [], 0, fork))
                parent.step_tokens = len(self.segs[of.current_segment].tokens)
                fork.children.append(parent)
        for b in self.branches:
            b.ctx, b.next_pos = self._closure(b.seg), self._next_pos(b.seg)
            b.path = b.fork.parent.path + (b.fork.base, b.fork.children.index(b) + 1) if b.fork else ()
        self.num_branches = len(self.branches) - 1
        for fork in reversed(frames):  # innermost first: spawn the missing steps, join when all are done
            if fork.plans == 0 or len(fork.children) > fork.plans:
                return self.finish("format_error")
            for k in range(len(fork.children) + 1, fork.plans + 1):
                if self.finish_reason is None:
                    self._spawn_step(fork, k)
            if self.finish_reason is None and fork.parent.state == "wait" and \
                    all(c.state == "done" for c in fork.children):
                self._join(fork)

    @staticmethod
    def _fork_of(parent: Branch) -> Fork:
        return parent.forked

    def _add_branch(self, b: Branch) -> Branch:
        self.branches.append(b)
        return b

    def _closure(self, seg: int) -> list[int]:
        """seg and every segment it sees, ascending (memoised: a segment's parents never change; not to mutate)."""
        if seg in self._closures:
            return self._closures[seg]
        out, todo = {seg}, [seg]
        while todo:
            for p in self.segs[todo.pop()].parents:
                if p not in out:
                    out.add(p)
                    todo.append(p)
        return self._closures.setdefault(seg, sorted(out))

    def ancestors(self, seg: int) -> list[Seg]:
        """The segments `seg` sees but itself, ascending (memoised like `_closure`; not to mutate)."""
        anc = self._ancestors.get(seg)
        if anc is None:
            anc = self._ancestors[seg] = [self.segs[a] for a in self._closure(seg) if a != seg]
        return anc

    def kv_chain(self, seg: int) -> tuple[int, ...]:
        """KV segments of `seg`'s context while resident: the ancestors' (ascending), its own last. Memoised:
        a logical segment keeps its KV segment until the request is detached."""
        chain = self._kv_chains.get(seg)
        if chain is None:
            chain = self._kv_chains[seg] = (*[a.kv for a in self.ancestors(seg)], self.segs[seg].kv)
        return chain

    def _next_pos(self, seg: int) -> int:
        s = self.segs[seg]
        return s.positions[-1] + 1 if s.positions else 0

    # state machine ----------------------------------------------------------------------------
    def live(self) -> list[Branch]:
        return [b for b in self.branches if b.state == "run"] if self.finish_reason is None else []

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            if self.branches[0].state == "wait":  # ended inside a fork: close every open step
                self._seal(self._fork_of(self.branches[0]))

    def _seal(self, fork: Fork) -> None:
        """Append a forced `</step>` to every open step (innermost forks first) so the output stays a
        well-formed prefix: parse_structure then computes exactly these segments and positions."""
        for c in fork.children:
            if c.state == "wait":  # its `</step>` ends the nested fork's join run, which it then closes
                inner = self._fork_of(c)
                self._seal(inner)
                self.segs.append(Seg([inner.seg] + [x.seg for x in inner.children]))
                c.seg = len(self.segs) - 1
                self.segs[inner.seg].follows.append(c.seg)
                c.next_pos = max(x.next_pos for x in inner.children)
            if c.state != "done":
                self.append(c, self.tags.step_end)
                c.state = "done"

    def open_steps(self) -> int:
        return sum(1 for b in self.branches if b.fork is not None and b.state != "done")

    def append(self, b: Branch, token: int, logprob: float = float("nan")) -> None:
        seg = self.segs[b.seg]
        seg.tokens.append(token)
        seg.positions.append(b.next_pos)
        seg.logprobs.append(logprob)
        b.next_pos += 1
        b.step_tokens += 1
        self.generated += 1

    def budget_left(self) -> int:
        return self.limits.max_total_tokens - self.generated

    def on_sampled(self, b: Branch, token: int, logprob: float) -> None:
        """Append a sampled token and take the transition it triggers."""
        if self.finish_reason is not None:
            return
        self.append(b, token, logprob)
        b.own.append(token)
        if token not in self._reacts:  # plain text (the common case): only a budget can end something
            return self._check_budgets(b)
        tags = self.tags
        in_step = b.fork is not None
        if token in self.eos:  # an answer ends in the trunk; a step that never closes is malformed
            return self.finish("stop" if not in_step else "format_error")
        if token == tags.guideline_end and b.depth < self.max_depth:
            return self._on_guideline_end(b)
        if token == tags.step_end and in_step:
            return self._close_step(b)
        if self.max_depth > 0 and not b.sequential and self._misplaced(b, token):
            return self.finish("format_error")
        self._check_budgets(b)

    def _misplaced(self, b: Branch, token: int) -> bool:
        """Tags the model may not write in parallel mode: `<step>` and `<takeaway>` (the engine writes
        them), `</step>` with no open step, `</takeaway>` outside a join's takeaway."""
        t = self.tags
        if token in (t.step, t.takeaway, t.step_end):
            return True
        if token == t.takeaway_end:
            seg = self.segs[b.seg]
            return len(seg.parents) < 2 or t.takeaway_end in seg.tokens[:-1]
        return False

    def _check_budgets(self, b: Branch) -> None:
        p = self.limits
        # leave room for the `</step>` that closes each open step should the request end here (counted only
        # near the budget: open steps <= branches)
        if self.generated + len(self.branches) >= p.max_total_tokens and \
                self.generated + self.open_steps() >= p.max_total_tokens or \
                b.next_pos - self.path_start + b.depth >= p.max_path_tokens:
            return self.finish("length")
        if b.fork is not None and b.step_tokens >= p.max_step_tokens - 1:
            self.append(b, self.tags.step_end)  # force-close the step (the tag counts too)
            self._close_step(b)

    def _count_plans(self, seg: int) -> int | None:
        """Pre-branch validator on the guideline block that ends `seg`: <guideline> (<plan> … </plan>)+
        </guideline> with no other tag; returns the plan count, None when malformed or over the limit."""
        t, toks = self.tags, self.segs[seg].tokens
        if not toks or toks[-1] != t.guideline_end:
            return None
        start = max((i for i, x in enumerate(toks) if x == t.guideline), default=None)
        if start is None:
            return None
        inner = [x for x in toks[start + 1:-1] if x in t.all]
        if not inner or len(inner) % 2 or inner != [t.plan, t.plan_end] * (len(inner) // 2):
            return None
        n = len(inner) // 2
        return n if n <= self.limits.max_plans else None

    def _on_guideline_end(self, b: Branch) -> None:
        plans = self._count_plans(b.seg)
        if plans is None:  # no fork happened here: to parse_structure this `</guideline>` is plain text
            self.no_fork_at.append((b.seg, len(self.segs[b.seg].tokens) - 1))
            return self.finish("format_error")
        # fork suppressed near the end of the budget: decoding goes on sequentially
        if self.budget_left() < self.limits.fork_margin_tokens:
            self.no_fork_at.append((b.seg, len(self.segs[b.seg].tokens) - 1))
            b.sequential = True
            return self._check_budgets(b)
        if self.generated + self.open_steps() + 2 * plans > self.limits.max_total_tokens:
            self.no_fork_at.append((b.seg, len(self.segs[b.seg].tokens) - 1))
            return self.finish("length")  # not even the step headers fit
        fork = b.forked = Fork(b, b.seg, b.next_pos, plans)
        b.state = "wait"
        self.num_forks += 1
        for k in range(1, plans + 1):
            if self.finish_reason is None:  # a step header may already exhaust the budget
                self._spawn_step(fork, k)

    def _spawn_step(self, fork: Fork, k: int) -> None:
        self.segs.append(Seg([fork.seg]))
        sid = len(self.segs) - 1
        self.segs[fork.seg].follows.append(sid)
        child = Branch(sid, fork.parent.ctx + [sid], fork.base, fork, path=fork.parent.path + (fork.base, k))
        fork.children.append(self._add_branch(child))
        self.num_branches += 1
        if self.kv is not None:  # resident: the child shares the parent's KV and gets a segment of its own
            self.kv.share(self._phys(fork.parent.ctx))
            self.segs[sid].kv = self.kv.new_segment()
        for t in self.headers["step"](k):
            self.append(child, t)
        self._check_budgets(child)

    def _close_step(self, b: Branch) -> None:
        b.state = "done"
        fork = b.fork
        if self.finish_reason is None and len(fork.children) == fork.plans and \
                all(c.state == "done" for c in fork.children):
            self._join(fork)

    def _join(self, fork: Fork) -> None:
        parent = fork.parent
        steps = [c.seg for c in fork.children]
        self.segs.append(Seg([fork.seg] + steps))
        sid = len(self.segs) - 1
        self.segs[fork.seg].follows.append(sid)
        old = parent.ctx
        parent.ctx = old + [s for c in fork.children for s in c.ctx[len(old):]] + [sid]
        if self.kv is not None:  # references move to the parent; the children's shared ones drop
            self.segs[sid].kv = self.kv.join(self._phys(old), [self._phys(c.ctx) for c in fork.children])[-1]
        for c in fork.children:
            self.branches.remove(c)
        parent.seg, parent.state = sid, "run"
        parent.next_pos = max(c.next_pos for c in fork.children)
        for t in self.headers["join"]:
            self.append(parent, t)
        self._check_budgets(parent)

    # KV residency ---------------------------------------------------------------------------
    def _phys(self, ctx: list[int]) -> list[int]:
        return [self.segs[s].kv for s in ctx]

    def attach(self, kv) -> None:
        """Make the request resident: a KV segment per logical segment, a reference per branch context.
        Slots are allocated later, when the scheduler extends a segment (prefill, or recompute)."""
        self.kv = kv
        self._kv_chains.clear()
        for seg in self.segs:
            seg.kv, seg.cached = kv.new_segment(), 0
        for b in self.branches:
            kv.share(self._phys(b.ctx))
        kv.release([seg.kv for seg in self.segs])  # drop the creation references

    def detach(self) -> None:
        """Drop every KV reference (finish, abort, or preemption: recompute from the tokens later)."""
        if self.kv is None:
            return
        for b in self.branches:
            self.kv.release(self._phys(b.ctx))
        for seg in self.segs:
            seg.kv, seg.cached = None, 0
        self.kv = None
        self._kv_chains.clear()

    def kv_contexts(self) -> list[list[int]]:
        return [self._phys(b.ctx) for b in self.branches] if self.kv is not None else []

    # output -----------------------------------------------------------------------------------
    def flat_order(self) -> list[int]:
        """Logical segments in text order: a segment, then what follows it (its steps, then its join)."""
        out, todo = [], [0]
        while todo:
            s = todo.pop()
            out.append(s)
            todo.extend(reversed(self.segs[s].follows))
        return out
