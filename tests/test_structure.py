"""structure.py against references written straight from the definitions (DESIGN.md, contracts.md, NPR-FACTS.md)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npr_async.structure import parse_structure, visibility_mask
from npr_async.tags import NPR_TAGS, TagIds

TAGS = TagIds({t: 1000 + k for k, t in enumerate(NPR_TAGS)})
G, GE, P, PE, S, SE, T, TE = (TAGS.by_tag[t] for t in NPR_TAGS)
X = 7  # a plain token


# --- random NPR trees -----------------------------------------------------------------------------------------
# body = list of items; item = ("text", n) | ("fork", plans, steps: list[(pre, body)], join_pre, takeaway_len)
def bodies(depth: int):
    text = st.tuples(st.just("text"), st.integers(1, 4))
    if depth == 0:
        return st.lists(text, max_size=3)
    step = st.tuples(st.integers(0, 2), st.deferred(lambda: bodies(depth - 1)))
    fork = st.tuples(st.just("fork"), st.integers(0, 3), st.lists(step, max_size=4), st.integers(0, 2),
                     st.integers(0, 3))
    return st.lists(st.one_of(text, fork), max_size=4)


def tag_sets():
    return st.lists(st.integers(0, 60), min_size=8, max_size=8, unique=True).map(
        lambda ids: TagIds(dict(zip(NPR_TAGS, ids))))


class Ref:
    """Serialises a tree and, independently of the parser, its segments, parents, positions and branch paths."""

    def __init__(self, tags: TagIds, plain: int):
        self.tags, self.plain = tags, plain
        self.ids, self.segs, self.pos, self.paths = [], [], [], []
        self.parents: list[list[int]] = [[]]
        self.forks = 0

    def emit(self, tok, seg, pos, path):
        self.ids.append(tok), self.segs.append(seg), self.pos.append(pos), self.paths.append(path)
        return pos + 1

    def body(self, items, seg, pos, path):
        """Emit items in segment seg from position pos; return (segment, next position) after them."""
        tg = self.tags
        for item in items:
            if item[0] == "text":
                for _ in range(item[1]):
                    pos = self.emit(self.plain, seg, pos, path)
                continue
            _, plans, steps, join_pre, take_len = item
            for tok in [tg.guideline] + [tg.plan, self.plain, tg.plan_end] * plans + [tg.guideline_end]:
                pos = self.emit(tok, seg, pos, path)
            fork, base, lasts, top = self.forks, pos, [], pos - 1
            self.forks += 1
            for k, (pre, step_body) in enumerate(steps):
                self.parents.append([seg])
                sseg, spos, spath = len(self.parents) - 1, base, path + ((fork, k),)
                for tok in [self.plain] * pre + [tg.step, self.plain]:
                    spos = self.emit(tok, sseg, spos, spath)
                sseg, spos = self.body(step_body, sseg, spos, spath)
                spos = self.emit(tg.step_end, sseg, spos, spath)
                lasts.append(sseg)
                top = max(top, spos - 1)
            self.parents.append([seg] + lasts)
            seg, pos = len(self.parents) - 1, top + 1
            for tok in [self.plain] * join_pre + [tg.takeaway] + [self.plain] * take_len + [tg.takeaway_end]:
                pos = self.emit(tok, seg, pos, path)
        return seg, pos


def reference(items, tags, plain, prompt=2):
    ref = Ref(tags, plain)
    pos = 0
    for _ in range(prompt):
        pos = ref.emit(plain, 0, pos, ())
    ref.body(items, 0, pos, ())
    return ref


def brute_visibility(segs, parents):
    """Token i sees j iff seg(j) == seg(i) and j <= i, or seg(j) is in the transitive closure of parents(seg(i))."""
    def ancestors(s):
        out, todo = set(), list(parents[s])
        while todo:
            a = todo.pop()
            if a not in out:
                out.add(a)
                todo.extend(parents[a])
        return out
    anc = [ancestors(s) for s in range(len(parents))]
    n = len(segs)
    return np.array([[(segs[j] == segs[i] and j <= i) or (segs[j] != segs[i] and segs[j] in anc[segs[i]])
                      for j in range(n)] for i in range(n)], dtype=bool).reshape(n, n)


def npr_mask(paths):
    """NPR's training mask: causal, except sibling steps of one fork never see each other."""
    n = len(paths)
    m = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(i + 1):
            pi, pj = dict(paths[i]), dict(paths[j])
            m[i, j] = all(pi[f] == pj[f] for f in pi.keys() & pj.keys())
    return m


@settings(max_examples=150, deadline=None)
@given(bodies(3), tag_sets(), st.integers(61, 99), st.integers(0, 3))
def test_random_trees_match_reference(items, tags, plain, prompt):
    ref = reference(items, tags, plain, prompt)
    s = parse_structure(ref.ids, tags, max_depth=5)
    assert s.segment_ids.tolist() == ref.segs
    assert s.positions.tolist() == ref.pos
    assert s.parents == ref.parents
    assert s.num_forks == ref.forks and s.open_forks == []
    assert s.positions.dtype == np.int32 and s.segment_ids.dtype == np.int32
    mask = visibility_mask(s.segment_ids, s.parents)
    assert np.array_equal(mask, brute_visibility(ref.segs, ref.parents))
    assert np.array_equal(mask, npr_mask(ref.paths))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([G, GE, P, PE, S, SE, T, TE, X, X, X]), max_size=40), st.integers(0, 6))
def test_arbitrary_sequences_never_raise_and_are_consistent(ids, max_depth):
    s = parse_structure(ids, TAGS, max_depth=max_depth)
    n = len(ids)
    assert len(s.positions) == len(s.segment_ids) == n
    assert all(p < k for k, ps in enumerate(s.parents) for p in ps)  # parents come first
    assert set(s.segment_ids.tolist()) <= set(range(len(s.parents)))
    for seg in range(len(s.parents)):  # each segment's positions are consecutive, in token order
        pos = s.positions[s.segment_ids == seg]
        assert np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))) if len(pos) else True
    assert np.array_equal(visibility_mask(s.segment_ids, s.parents), brute_visibility(s.segment_ids, s.parents))
    # A prefix is parsed like the whole sequence up to its last tag (the engine resumes from prefixes).
    for k in range(n + 1):
        tags_in = [i for i in range(k) if ids[i] in TAGS.all]
        if tags_in:
            e = tags_in[-1] + 1
            p = parse_structure(ids[:k], TAGS, max_depth=max_depth)
            assert p.segment_ids[:e].tolist() == s.segment_ids[:e].tolist()
            assert p.positions[:e].tolist() == s.positions[:e].tolist()


def test_hand_case_one_fork():
    # prompt x, <guideline><plan>x</plan><plan>x</plan></guideline>, two steps, join, answer
    ids = [X, G, P, X, PE, P, X, PE, GE, X, S, X, X, SE, X, S, X, SE, X, T, X, TE, X]
    s = parse_structure(ids, TAGS)
    assert s.segment_ids.tolist() == [0] * 9 + [1] * 5 + [2] * 4 + [3] * 5
    # steps start at pos(</guideline>) + 1 = 9; step 1 ends at 13, step 2 at 12; the join starts at 14
    assert s.positions.tolist() == list(range(9)) + [9, 10, 11, 12, 13] + [9, 10, 11, 12] + [14, 15, 16, 17, 18]
    assert s.parents == [[], [0], [0], [0, 1, 2]]
    mask = visibility_mask(s.segment_ids, s.parents)
    assert not mask[14:18, 9:14].any() and not mask[9:14, 14:18].any()  # siblings blind both ways
    assert mask[18:, :].sum(1).tolist() == [19, 20, 21, 22, 23]  # the join sees everything before it


def test_engine_headers_open_segments():
    nl = 5  # "\n" token of the forced headers \n<step>\nK: and \n<takeaway>\n
    ids = [X, G, P, X, PE, GE, nl, S, nl, 9, X, SE, nl, T, nl, X]
    s = parse_structure(ids, TAGS)
    assert s.segment_ids.tolist() == [0] * 6 + [1] * 6 + [2] * 4
    assert s.positions.tolist() == list(range(6)) + list(range(6, 12)) + list(range(12, 16))
    assert s.parents == [[], [0], [0, 1]]


def test_nested_fork_and_open_frames():
    ids = [X, G, P, X, PE, GE,  # trunk, fork A at segment 0, base 6
           S, X, G, P, X, PE, GE,  # step A1 (seg 1) opens nested fork B, base 13
           S, X, SE, S, X, X, SE,  # steps B1 (seg 2) and B2 (seg 3)
           T, X, TE, X, SE,  # nested join (seg 4) from 16, A1's last segment
           S, X]  # step A2 (seg 5), still open
    s = parse_structure(ids, TAGS)
    assert s.parents == [[], [0], [1], [1], [1, 2, 3], [0]]
    assert s.positions[13:20].tolist() == [13, 14, 15, 13, 14, 15, 16]
    assert s.positions[20:25].tolist() == [17, 18, 19, 20, 21]
    assert s.positions[25:].tolist() == [6, 7]
    (f,) = s.open_forks
    assert (f.fork_segment, f.base_position, f.step_segments, f.current_segment, f.max_step_position, f.depth) \
        == (0, 6, [4], 5, 21, 0)
    # A prefix ending inside the nested fork keeps both frames; one ending right after </guideline> too.
    inner = parse_structure(ids[:18], TAGS).open_forks
    assert [(o.fork_segment, o.current_segment, o.step_segments) for o in inner] == [(0, 1, []), (1, 3, [2])]
    just_forked = parse_structure(ids[:6], TAGS).open_forks
    assert [(o.fork_segment, o.base_position, o.current_segment) for o in just_forked] == [(0, 6, None)]


def test_depth_limit_and_sequential_mode():
    ids = [X, G, P, X, PE, GE, S, X, G, GE, S, X, SE, T, X, TE, SE, T, TE]
    s1 = parse_structure(ids, TAGS, max_depth=1)  # the nested </guideline> does not fork
    assert s1.num_forks == 1
    # the first </step> (meant for the unforked nested step) closes the outer step; the rest is the join
    assert s1.segment_ids.tolist() == [0] * 6 + [1] * 7 + [2] * 6
    s0 = parse_structure(ids, TAGS, max_depth=0)
    assert s0.segment_ids.tolist() == [0] * len(ids) and s0.positions.tolist() == list(range(len(ids)))
    skipped = parse_structure(ids, TAGS, no_fork_at={5})
    assert skipped.num_forks == 1 and skipped.segment_ids[:10].tolist() == [0] * 10


def test_malformed_sequences_are_handled():
    stray = parse_structure([X, SE, T, TE, S, X], TAGS)  # tags outside any fork: ordinary trunk tokens
    assert stray.segment_ids.tolist() == [0] * 6 and stray.parents == [[]]
    no_steps = parse_structure([X, GE, X, T, X], TAGS)  # a fork with no steps: the join starts at p
    assert no_steps.parents == [[], [0]] and no_steps.positions.tolist() == [0, 1, 2, 3, 4]
    trailing = parse_structure([X, GE, S, X, SE, X, X], TAGS)  # untagged run after </step>: the join
    assert trailing.parents == [[], [0], [0, 1]] and trailing.positions.tolist()[-2:] == [5, 6]
    assert trailing.open_forks == []
    unclosed = parse_structure([GE, S, X, X], TAGS)
    assert unclosed.open_forks[0].current_segment == 1 and unclosed.positions.tolist() == [0, 1, 2, 3]
    assert parse_structure([], TAGS).positions.shape == (0,)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="1-D"):
        parse_structure([[1, 2]], TAGS)
    with pytest.raises(ValueError, match="integers"):
        parse_structure([1.5], TAGS)
    with pytest.raises(ValueError, match="TagIds"):
        parse_structure([1], {"<step>": 1})
    with pytest.raises(ValueError, match="segment 1 has parent 5"):
        visibility_mask([0, 1], [[], [5]])
    with pytest.raises(ValueError, match="segment_ids must lie in 0..0"):
        visibility_mask([0, 3], [[]])
    with pytest.raises(ValueError, match="1-D"):
        visibility_mask([[0]], [[]])


def test_visibility_is_vectorised_at_scale():
    n, ids = 6000, []
    while len(ids) < n:
        ids += [X] * 20 + [G, GE] + [S, X, X, SE] * 4 + [T, TE]
    s = parse_structure(ids, TAGS)
    mask = visibility_mask(s.segment_ids, s.parents)
    assert mask.shape == (len(ids), len(ids)) and mask[-1].all()  # the last join sees everything
    last_step = max(i for i, t in enumerate(ids) if t == S)  # the last fork's 4th step sees its trunk only
    assert not mask[last_step, last_step - 12:last_step].any() and mask[last_step, :last_step - 12].all()
