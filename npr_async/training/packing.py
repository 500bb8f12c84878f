"""Tree packing: samples (trajectories or SFT examples) → micro-batches of flat tokens.

A sample is a token tree flattened in text order with its own positions and segment visibility (DESIGN.md,
"Trajectory"). The learner never re-derives structure from text for a trajectory: positions and segments
are the engine's, so training and inference see the same tree.

Scoring: token j is predicted from the logits of its *predecessor*, the last token before j that j can
see (max visible index < j). Inside a segment that is j − 1; for the first token of a step it is the fork
point (the step's parent context), never the sibling step just before it in flat order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Sample:
    token_ids: np.ndarray  # int32[N]
    positions: np.ndarray  # int32[N]
    segment_ids: np.ndarray  # int32[N]
    parents: list[list[int]]  # direct parents per segment
    loss_mask: np.ndarray  # bool[N]: tokens that are targets (sampled for RL, completion for SFT)
    old_logprobs: np.ndarray | None = None  # float32[N]: the engine's logprobs (NaN where not sampled)
    meta: dict = field(default_factory=dict)  # per-sample loss inputs (reward, advantage coefficient, ...)

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def from_trajectory(cls, traj, **meta) -> "Sample":
        sampled = traj.sampled_mask().copy()
        sampled[0] = False  # the first token has no predecessor (it is always prompt anyway)
        return cls(traj.ids().copy(), traj.pos().copy(), traj.segs().copy(), traj.parents(), sampled,
                   traj.lps().copy(), dict(meta))


def closure(parents: list[list[int]]) -> np.ndarray:
    """anc[s, a]: segment s sees segment a in full (a in the transitive closure of parents(s))."""
    n = len(parents)
    anc = np.zeros((n, n), dtype=np.bool_)
    done: list[bool] = [False] * n

    def visit(s: int, stack: tuple[int, ...] = ()) -> None:
        if done[s]:
            return
        if s in stack:
            raise ValueError(f"segment parents form a cycle through segment {s}")
        for p in parents[s]:
            if not 0 <= p < n:
                raise ValueError(f"segment {s} has parent {p} outside 0..{n - 1}")
            visit(p, stack + (s,))
            anc[s, p] = True
            anc[s] |= anc[p]
        done[s] = True

    for s in range(n):
        visit(s)
    return anc


def predecessors(segment_ids: np.ndarray, parents: list[list[int]]) -> np.ndarray:
    """For each token j: the largest index i < j that j sees, or -1 if none (the first token)."""
    segs = np.asarray(segment_ids)
    anc = closure(parents)
    last = np.full(len(parents), -1, dtype=np.int64)  # last index seen so far of each segment
    pred = np.arange(-1, len(segs) - 1, dtype=np.int64)  # inside a run of one segment: j - 1
    starts = np.flatnonzero(np.r_[True, segs[1:] != segs[:-1]]) if len(segs) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(segs)]
    for a, b in zip(starts, ends):
        s = segs[a]
        visible = anc[s].copy()
        visible[s] = True
        pred[a] = last[visible].max() if visible.any() else -1
        last[s] = b - 1
    return pred


def sample_mask(segment_ids: np.ndarray, parents: list[list[int]]) -> np.ndarray:
    """bool[N, N]: token i sees token j (same segment and j <= i, or seg(j) an ancestor of seg(i))."""
    segs = np.asarray(segment_ids)
    anc = closure(parents)
    n = len(segs)
    same = (segs[:, None] == segs[None, :]) & np.tri(n, dtype=np.bool_)
    return same | anc[segs[:, None], segs[None, :]]


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # int64[T]
    positions: torch.Tensor  # int64[T]
    segment_ids: torch.Tensor  # int32[T]: unique across the samples of the micro-batch
    ancestors: torch.Tensor  # bool[S, S] over those segment ids (block-diagonal across samples)
    sample_index: torch.Tensor  # int64[T]: which sample (index into `samples`) each token belongs to
    pred_index: torch.Tensor  # int64[n]: predecessor of each target token
    target_index: torch.Tensor  # int64[n]: the target tokens (loss_mask True), flat indices
    samples: list[Sample]
    bounds: list[tuple[int, int]]  # [start, end) of each sample in the flat tokens

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[self.target_index]

    @property
    def target_sample(self) -> torch.Tensor:
        return self.sample_index[self.target_index]

    def dense_mask(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """bool[T, T] (True = may attend) of tokens start..end: for SDPA on CPU. Never built on a GPU path."""
        seg = self.segment_ids[start:end].long()
        idx = torch.arange(len(seg), device=seg.device)
        same = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
        return same | self.ancestors[seg[:, None], seg[None, :]]

    def to(self, device) -> "MicroBatch":
        moved = {k: getattr(self, k).to(device) for k in
                 ("input_ids", "positions", "segment_ids", "ancestors", "sample_index", "pred_index",
                  "target_index")}
        return MicroBatch(**moved, samples=self.samples, bounds=self.bounds)


def collate(samples: list[Sample]) -> MicroBatch:
    """Concatenate samples into one flat micro-batch (no padding)."""
    ids, pos, seg, sidx, pred, tgt, bounds = [], [], [], [], [], [], []
    nseg = sum(len(s.parents) for s in samples)
    anc = np.zeros((nseg, nseg), dtype=np.bool_)
    tok0 = seg0 = 0
    for k, s in enumerate(samples):
        n, m = len(s), len(s.parents)
        if n == 0:
            raise ValueError(f"sample {k} is empty")
        if not (len(s.positions) == len(s.segment_ids) == len(s.loss_mask) == n):
            raise ValueError(f"sample {k}: arrays of different lengths")
        anc[seg0:seg0 + m, seg0:seg0 + m] = closure(s.parents)
        p = predecessors(s.segment_ids, s.parents)
        if (s.loss_mask & (p < 0)).any():
            raise ValueError(f"sample {k}: a target token has no visible predecessor")
        t = np.flatnonzero(s.loss_mask)
        ids.append(s.token_ids)
        pos.append(s.positions)
        seg.append(s.segment_ids.astype(np.int64) + seg0)
        sidx.append(np.full(n, k))
        pred.append(p[t] + tok0)
        tgt.append(t + tok0)
        bounds.append((tok0, tok0 + n))
        tok0 += n
        seg0 += m
    cat = lambda xs, dt: torch.from_numpy(np.concatenate(xs).astype(dt))  # noqa: E731
    return MicroBatch(cat(ids, np.int64), cat(pos, np.int64), cat(seg, np.int32), torch.from_numpy(anc),
                      cat(sidx, np.int64), cat(pred, np.int64), cat(tgt, np.int64), list(samples), bounds)


def pack(samples: list[Sample], max_tokens: int) -> list[MicroBatch]:
    """First-fit-decreasing bin packing by token count; a sample longer than `max_tokens` gets its own."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(samples[i])
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return [collate([samples[i] for i in sorted(b)]) for b in bins]
