"""Positions and segment visibility of an NPR token sequence: the one function engine, SFT packer and tests share.

Rules (docs/contracts.md, "Structure"):
- Segment 0 holds the prompt and the trunk up to and including the first forking `</guideline>`.
- A `</guideline>` at depth < max_depth opens a fork at the current segment F, base position
  p = pos(`</guideline>`) + 1. The tokens after it (or after a step's `</step>`) up to and including the next
  tag start a new segment: a **step** if that tag is `<step>` (parents [F], positions from p), otherwise the
  **join** (parents [F] + last segment of each step, positions from 1 + the highest position in the steps).
- A `</guideline>` inside a step opens a nested fork from the step's current segment; after its join the step
  goes on in the join segment, which becomes the step's last segment.

Malformed input never raises; it is handled so that the engine, which follows the same rules token by token,
produces the same result:
- Outside a step, `<step>`, `</step>`, `<takeaway>`, … are ordinary tokens of the current segment.
- Inside a step, `</step>` always closes the innermost open step; `<step>`, `<plan>`, … are ordinary tokens.
- The tag that ends the run after `</guideline>`/`</step>` belongs to the new segment; unless it is `<step>`
  it then also acts there (e.g. a `</guideline>` that ends a join run opens a fork from the join segment).
- A `</guideline>` at depth >= max_depth (or listed in `no_fork_at`) is an ordinary token: decoding went on
  sequentially there. max_depth=0 disables forks (sequential decoding).
- Trailing tokens after `</step>`/`</guideline>` with no tag yet are the join segment (the engine forces
  whole headers, so it never stops there). A sequence that ends right after `</guideline>` or `</step>`, or
  inside a step, leaves its frames in `open_forks` so generation can resume from that prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

import numpy as np

from npr_async.tags import TagIds


@dataclass
class OpenFork:
    """A fork frame still open at the end of the sequence (outermost first in `Structure.open_forks`)."""
    fork_segment: int  # F: the segment the steps branch from
    base_position: int  # p: where every step of this fork starts
    step_segments: list[int]  # the last segment of each finished step, in order
    current_segment: int | None  # the current step's segment (None: between steps / right after </guideline>)
    max_step_position: int  # highest position reached by the finished steps (p - 1 if none)
    depth: int  # 0 for a top-level fork


@dataclass
class Structure:
    positions: np.ndarray  # int32[N]
    segment_ids: np.ndarray  # int32[N]
    parents: list[list[int]]  # direct parents of each segment
    open_forks: list[OpenFork] = field(default_factory=list)
    num_forks: int = 0  # forks opened (nested ones included)
    num_steps: int = 0  # step segments opened


@dataclass
class _Frame:
    fork_segment: int
    base: int
    depth: int
    steps: list[int] = field(default_factory=list)
    max_pos: int = -1
    pending_from: int | None = None  # token index where the not-yet-classified run starts
    step_start: int = 0  # token index of the current step's first token


def parse_structure(token_ids, tag_ids: TagIds, max_depth: int = 5,
                    no_fork_at: Collection[int] = ()) -> Structure:
    """Positions, segment ids and parents of `token_ids` (prompt included) per the rules above.

    `no_fork_at`: token indices of `</guideline>` tokens where the engine skipped the fork (budget margin).
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"parse_structure: token_ids must be 1-D, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"parse_structure: token_ids must be integers, got dtype {ids.dtype}")
    if not isinstance(tag_ids, TagIds):
        raise ValueError(f"parse_structure: tag_ids must be a TagIds, got {type(tag_ids).__name__}")
    n = len(ids)
    positions = np.zeros(n, dtype=np.int32)
    segs = np.zeros(n, dtype=np.int32)
    parents: list[list[int]] = [[]]
    frames: list[_Frame] = []
    cur, next_pos, num_forks, num_steps = 0, 0, 0, 0
    tags, skip = tag_ids.all, frozenset(no_fork_at)

    def resolve(frame: _Frame, end: int, as_step: bool) -> None:
        """Classify the run frame.pending_from..end (inclusive) as a new step or as the join."""
        nonlocal cur, next_pos, num_steps
        start = frame.pending_from
        if as_step:
            parents.append([frame.fork_segment])
            first = frame.base
            frame.step_start = start
            num_steps += 1
        else:
            parents.append([frame.fork_segment] + frame.steps)
            first = max(frame.max_pos, frame.base - 1) + 1
            frames.pop()
        frame.pending_from = None
        cur = len(parents) - 1
        segs[start:end + 1] = cur
        positions[start:end + 1] = np.arange(first, first + end + 1 - start)
        next_pos = first + end + 1 - start

    for i in range(n):
        t = int(ids[i])
        top = frames[-1] if frames else None
        if top is not None and top.pending_from is not None:
            if t not in tags:
                continue  # still unclassified
            resolve(top, i, as_step=t == tag_ids.step)
            if t == tag_ids.step:
                continue
        else:
            segs[i], positions[i] = cur, next_pos
            next_pos += 1
        if t == tag_ids.guideline_end and len(frames) < max_depth and i not in skip:
            frames.append(_Frame(cur, int(positions[i]) + 1, len(frames), pending_from=i + 1))
            num_forks += 1
        elif t == tag_ids.step_end and frames and frames[-1].pending_from is None:
            top = frames[-1]  # inside a step: close it
            top.steps.append(cur)
            top.max_pos = max(top.max_pos, int(positions[top.step_start:i + 1].max()))
            top.pending_from = i + 1

    if frames and frames[-1].pending_from is not None and frames[-1].pending_from < n:
        resolve(frames[-1], n - 1, as_step=False)  # trailing untagged run: the join
    open_forks = []
    for k, f in enumerate(frames):
        in_step = f.pending_from is None
        current = (frames[k + 1].fork_segment if k + 1 < len(frames) else cur) if in_step else None
        open_forks.append(OpenFork(f.fork_segment, f.base, list(f.steps), current,
                                   max(f.max_pos, f.base - 1), f.depth))
    return Structure(positions, segs, parents, open_forks, num_forks, num_steps)


def ancestor_closure(parents: list[list[int]]) -> np.ndarray:
    """bool[S, S]: [s, a] is True iff a is reachable from s through `parents` (s itself only via a cycle)."""
    s = len(parents)
    reach = np.zeros((s, s), dtype=bool)
    for seg, ps in enumerate(parents):
        for p in ps:
            if not (isinstance(p, (int, np.integer)) and 0 <= p < s):
                raise ValueError(f"visibility: segment {seg} has parent {p!r}, outside 0..{s - 1}")
            reach[seg, p] = True
    for k in range(s):  # Warshall: one vectorised row update per intermediate segment
        reach |= reach[:, k:k + 1] & reach[k:k + 1, :]
    return reach


def visibility_mask(segment_ids, parents: list[list[int]]) -> np.ndarray:
    """bool[N, N]: token i sees token j iff seg(j) == seg(i) and j <= i, or seg(j) is an ancestor of seg(i)."""
    seg = np.asarray(segment_ids)
    if seg.ndim != 1:
        raise ValueError(f"visibility_mask: segment_ids must be 1-D, got shape {seg.shape}")
    if seg.size and (seg.min() < 0 or seg.max() >= len(parents)):
        raise ValueError(f"visibility_mask: segment_ids must lie in 0..{len(parents) - 1}, "
                         f"got {int(seg.min())}..{int(seg.max())}")
    reach = ancestor_closure(parents)
    n = len(seg)
    same = seg[:, None] == seg[None, :]
    causal = np.tri(n, dtype=bool)
    return np.where(same, causal, reach[seg[:, None], seg[None, :]])
