"""The data of one request's fork/join tree: logical segments, forks and branches (engine/npr_state.py
drives them). Plain records with no behaviour beyond `Branch.depth`, so the state machine, the scheduler and
tests share one definition.
- `Seg`: a logical segment (tokens, positions, logprobs, parents) and the KV segment that holds it;
- `Fork`: one `</guideline>` fork: the segment it branches from, the steps' base position, its children;
- `Branch`: the trunk or one step, decoding at the end of its current segment.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Seg:
    parents: list[int]
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # NaN where not sampled
    follows: list[int] = field(default_factory=list)  # segments after this one in flat order (steps, join)
    kv: int | None = None  # KV segment id (None while preempted)
    cached: int = 0  # leading tokens whose K/V are in the store


@dataclass
class Fork:
    parent: "Branch"
    seg: int  # F: the segment the steps branch from
    base: int  # position of every step's first token
    plans: int
    children: list["Branch"] = field(default_factory=list)


@dataclass
class Branch:
    seg: int  # current segment: tokens are appended here
    ctx: list[int]  # logical segments it sees, ascending, its own last; one KV reference each
    next_pos: int
    fork: Fork | None = None  # the fork it is a step of (None: the trunk)
    draw: tuple | None = None  # the engine sampler's state (BatchSampler): stream seed from `path`, params, row
    path: tuple = ()  # (fork base position, step index) per fork level: names the branch for its random stream
    own: list[int] = field(default_factory=list)  # its sampled tokens (repetition penalty in branches)
    step_tokens: int = 0
    state: str = "run"  # run | wait (children running) | done (step closed)
    sequential: bool = False  # a fork was suppressed here: the model writes its steps itself
    forked: Fork | None = None  # the fork it waits on (state "wait")

    def __post_init__(self):
        # fork levels above it, counted once (a branch's fork never changes; read at every sampled token)
        self.depth = 0 if self.fork is None else self.fork.parent.depth + 1
