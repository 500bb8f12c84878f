"""A finished engine request as the trajectory contract's message (npr_async/messages.py `Trajectory`).

The request holds its segments as a tree (prompt, guideline, one step per branch, takeaway, ...); the message
lays them out flat in the order `Request.flat_order` gives (every segment after its parents), renumbers the
segments in that order and keeps each token's position (the branches of a fork start at one base position),
its sampling logprob (NaN where the token was forced or prompt) and the critical path's length.
"""
from __future__ import annotations

import numpy as np

from engine.npr_state import Request
from npr_async.messages import Trajectory


def to_trajectory(req: Request, version: int, tokenizer) -> Trajectory:
    """`req` (finished or aborted: finish_reason None reads as "abort") generated under weights `version`."""
    order = req.flat_order()
    new = {s: i for i, s in enumerate(order)}
    ids, pos, seg_ids, lps = [], [], [], []
    for s in order:
        seg = req.segs[s]
        ids += seg.tokens
        pos += seg.positions
        seg_ids += [new[s]] * len(seg.tokens)
        lps += seg.logprobs
    lps_a = np.asarray(lps, dtype=np.float32)
    pos_a = np.asarray(pos, dtype=np.int32)
    gen_pos = pos_a[req.prompt_len:]
    return Trajectory.build(
        token_ids=ids, positions=pos_a, segment_ids=seg_ids,
        parents=[[new[p] for p in req.segs[s].parents] for s in order],
        logprobs=lps_a, sampled=~np.isnan(lps_a), prompt_id=req.prompt_id, sample_idx=req.sample_idx,
        version=version, prompt_len=req.prompt_len, finish_reason=req.finish_reason or "abort",
        text=tokenizer.decode(ids[req.prompt_len:], skip_special_tokens=True),
        num_tokens=req.generated, num_forks=req.num_forks, num_branches=req.num_branches,
        critical_path=int(gen_pos.max()) + 1 - req.path_start if len(gen_pos) else 0, seed=req.seed)


def no_fork_at(req: Request) -> list[int]:
    """Token indices (flat order) of `</guideline>`s where the fork was suppressed (parse_structure's
    `no_fork_at`)."""
    start, offsets = 0, {}
    for s in req.flat_order():
        offsets[s] = start
        start += len(req.segs[s].tokens)
    return [offsets[s] + k for s, k in req.no_fork_at]
