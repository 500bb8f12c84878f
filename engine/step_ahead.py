"""The engine loop's step ahead (`engine.llm.STEP_AHEAD`): hide the host's work behind the GPU.

After a CUDA-graph step in which every row decodes, the host has the state machine, the schedule and the
slot table of the next step to do, while the GPU waits for them. A step ahead is that next step launched
before the host has read this one's tokens: each row is fed the token step N draws on the device, at the
next position, into one more slot of its segment, and draws the token after it (its uniform keyed by that
position; its own tokens on the device already hold the fed one, for the repetition penalty). Once N's
transitions are taken, `settle` keeps what agrees with them; the rest is given back. A kept token is the one
the serial loop would draw: the same logits (up to rounding in another batch shape) and the same uniform.
"""
from __future__ import annotations

from operator import attrgetter

import torch

from engine.scheduler import Item

_context_len = attrgetter("length")


def launch(llm, items, graphs, fed: torch.Tensor):
    """Step N+1 of the decode-only graph step N over `items`, fed `fed` (N's drawn tokens, on the device).
    Returns (its items, their drawn tokens on the device, the pair `BatchSampler.collect` reads), or None
    when the pool or the graphs' slot table could not hold it."""
    if llm.kv.num_free < 2 * len(items) or max(map(_context_len, items)) >= graphs.max_context:
        return None  # (2x: the step after needs as many slots, which the scheduler would otherwise preempt for)
    nxt = [Item(it.req, it.seg, it.start + 1, 1, it.sample, it.kvs, it.length + 1) for it in items]
    llm.kv.extend_many([(it.kvs[-1], 1) for it in items])
    for it in items:
        it.req.segs[it.seg].cached += 1
    logits = graphs.run_items(nxt, llm.kv.slots, fed=fed)
    return nxt, *llm.sampler.launch(logits, nxt, ahead=1)


def settle(llm, nxt, fed: list[int]) -> list[bool]:
    """After step N's transitions, per row of the step ahead: does its drawn token stand? It does when the
    branch decodes on from the token it was fed. The fed token's K/V stay whenever it became the segment's
    next token; otherwise (e.g. its request finished first) the slot goes back to the pool."""
    on = []
    for it, t_fed in zip(nxt, fed):
        req, b = it.req, it.sample
        seg = req.segs[it.seg]
        if len(seg.tokens) <= it.start or seg.tokens[it.start] != t_fed:
            seg.cached -= 1
            llm.kv.shrink(it.kvs[-1], 1)
            llm.graphs.forget_last(req, it.seg, it.start)
            on.append(False)
        else:
            on.append(req.finish_reason is None and b.state == "run" and b.seg == it.seg
                      and len(seg.tokens) == it.start + 1)
    return on
