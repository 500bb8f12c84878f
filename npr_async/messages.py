"""Wire messages. `Trajectory`: the one contract between engine, verifier and learner (DESIGN.md, "Trajectory").

Arrays travel as raw little-endian bytes (numpy `frombuffer`), never Python lists. Tokens are grouped by
segment in the order they were produced: prompt + trunk, step 1 … step n of a fork, then the trunk after
the join. Token i sees token j iff seg(j) == seg(i) and j <= i, or seg(j) is in the transitive closure
of parents(seg(i)). `parents` lists each segment's direct parents only.
"""
from __future__ import annotations

import math

import msgspec
import numpy as np


class Segment(msgspec.Struct, array_like=True, frozen=True):
    parents: list[int]


class Trajectory(msgspec.Struct, kw_only=True):
    prompt_id: str
    sample_idx: int = 0
    version: int = 0
    token_ids: bytes  # int32[N]
    positions: bytes  # int32[N]
    segment_ids: bytes  # int32[N]
    segments: list[Segment]
    logprobs: bytes  # float32[N], NaN where not sampled
    sampled: bytes  # bool[N]: sampled by the policy (vs prompt or forced by the engine)
    prompt_len: int
    finish_reason: str  # stop | length | format_error | abort
    text: str = ""  # the generated part, flattened in token order
    num_tokens: int = 0  # all tokens, all branches (prompt excluded)
    critical_path: int = 0  # longest chain of generated tokens (prompt excluded)
    num_forks: int = 0
    num_branches: int = 0
    seed: int | None = None

    # numpy views (zero-copy) -------------------------------------------------------------------
    def ids(self) -> np.ndarray:
        return np.frombuffer(self.token_ids, dtype=np.int32)

    def pos(self) -> np.ndarray:
        return np.frombuffer(self.positions, dtype=np.int32)

    def segs(self) -> np.ndarray:
        return np.frombuffer(self.segment_ids, dtype=np.int32)

    def lps(self) -> np.ndarray:
        return np.frombuffer(self.logprobs, dtype=np.float32)

    def sampled_mask(self) -> np.ndarray:
        return np.frombuffer(self.sampled, dtype=np.bool_)

    def parents(self) -> list[list[int]]:
        return [list(s.parents) for s in self.segments]

    def __len__(self) -> int:
        return len(self.token_ids) // 4

    @classmethod
    def build(cls, *, token_ids, positions, segment_ids, parents, logprobs, sampled, **fields) -> "Trajectory":
        """Make a Trajectory from array-likes, checking that every array has the same length."""
        arrays = {
            "token_ids": np.ascontiguousarray(token_ids, dtype=np.int32),
            "positions": np.ascontiguousarray(positions, dtype=np.int32),
            "segment_ids": np.ascontiguousarray(segment_ids, dtype=np.int32),
            "logprobs": np.ascontiguousarray(
                [math.nan if x is None else x for x in logprobs] if isinstance(logprobs, list) else logprobs,
                dtype=np.float32),
            "sampled": np.ascontiguousarray(sampled, dtype=np.bool_),
        }
        n = len(arrays["token_ids"])
        for name, arr in arrays.items():
            if arr.ndim != 1 or len(arr) != n:
                raise ValueError(f"Trajectory.{name} has shape {arr.shape}, expected ({n},)")
        segs = [Segment(list(map(int, p))) for p in parents]
        if n and (arrays["segment_ids"].min() < 0 or arrays["segment_ids"].max() >= len(segs)):
            raise ValueError(f"Trajectory.segment_ids refer to segments outside 0..{len(segs) - 1}")
        return cls(**{k: v.tobytes() for k, v in arrays.items()}, segments=segs, **fields)

    def to_json_row(self) -> dict:
        """The documented JSONL row of `npr-async generate` (lists, null where not sampled)."""
        lps = self.lps()
        return {
            "prompt_id": self.prompt_id, "sample_idx": self.sample_idx, "version": self.version,
            "token_ids": self.ids().tolist(), "positions": self.pos().tolist(),
            "segment_ids": self.segs().tolist(),
            "segments": [{"parents": list(s.parents)} for s in self.segments],
            "logprobs": [None if math.isnan(x) else float(x) for x in lps.tolist()],
            "sampled": self.sampled_mask().tolist(), "prompt_len": self.prompt_len,
            "finish_reason": self.finish_reason, "text": self.text, "num_tokens": self.num_tokens,
            "critical_path": self.critical_path, "num_forks": self.num_forks,
            "num_branches": self.num_branches, "seed": self.seed,
        }

    @classmethod
    def from_json_row(cls, row: dict) -> "Trajectory":
        keys = ("token_ids", "positions", "segment_ids", "segments", "logprobs", "sampled", "prompt_len",
                "finish_reason")
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"trajectory row lacks {missing}")
        extra = {k: row[k] for k in ("prompt_id", "sample_idx", "version", "text", "num_tokens", "critical_path",
                                     "num_forks", "num_branches", "seed") if k in row and row[k] is not None}
        extra.setdefault("prompt_id", "")
        return cls.build(token_ids=row["token_ids"], positions=row["positions"], segment_ids=row["segment_ids"],
                         parents=[s["parents"] for s in row["segments"]], logprobs=row["logprobs"],
                         sampled=row["sampled"], prompt_len=row["prompt_len"],
                         finish_reason=row["finish_reason"], **extra)
