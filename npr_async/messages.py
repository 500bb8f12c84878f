"""Wire messages. `Trajectory`: the one contract between engine, verifier and learner (DESIGN.md, "Trajectory").

Every type that crosses a process boundary lives here. Message bodies are tagged msgspec Structs, so one
decoder (`Envelope`) handles them all; arrays are raw bytes, never lists.

Arrays travel as raw little-endian bytes (numpy `frombuffer`), never Python lists. Tokens are grouped by
segment in the order they were produced: prompt + trunk, step 1 … step n of a fork, then the trunk after
the join. Token i sees token j iff seg(j) == seg(i) and j <= i, or seg(j) is in the transitive closure
of parents(seg(i)). `parents` lists each segment's direct parents only.
"""
from __future__ import annotations

import math
from typing import Any, Union

import msgspec
import numpy as np


class Segment(msgspec.Struct, array_like=True, frozen=True):
    parents: list[int]


class Trajectory(msgspec.Struct, kw_only=True, tag="trajectory"):
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


# ---------------------------------------------------------------------------------------------------------
# Everything below is a message body of the transport (npr_async/transport, docs/transport.md). The tag
# (`type` on the wire) lets one `Envelope` decoder handle all of them.

class VerifiedTrajectory(msgspec.Struct, kw_only=True, tag="verified"):
    """A trajectory scored by the verifier pool, on its way to the replay buffer."""
    trajectory: Trajectory
    reward: float
    correct: bool
    verifier: str  # registry name or dotted path of the verifier that scored it
    format_ok: bool = True  # NPR format validator; False is filtered or penalised per stage
    details: dict[str, Any] = {}  # verifier-specific (parsed answer, failed test, timing); JSON-able values


class SamplingSpec(msgspec.Struct, kw_only=True, frozen=True):
    """engine.sampler.SamplingParams on the wire (None: the engine's config default)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    branch_repetition_penalty: float | None = None
    seed: int | None = None
    max_total_tokens: int | None = None
    max_path_tokens: int | None = None
    max_step_tokens: int | None = None
    max_plans: int | None = None
    parallel: bool | None = None


class Prompt(msgspec.Struct, kw_only=True, frozen=True):
    prompt_id: str
    text: str = ""
    token_ids: bytes = b""  # int32[N]; empty: the rollout tokenizes `text`
    task: dict[str, Any] = {}  # the dataset row the verifier needs (answer, tests); passed through

    def ids(self) -> np.ndarray:
        return np.frombuffer(self.token_ids, dtype=np.int32)


class RolloutRequest(msgspec.Struct, kw_only=True, tag="rollout_request"):
    """Controller → rollout generator: sample `samples_per_prompt` trajectories of each prompt with `version`."""
    step: int
    version: int  # the generator refuses to start on any other weight version
    prompts: list[Prompt]
    sampling: SamplingSpec = SamplingSpec()
    samples_per_prompt: int = 1
    request_id: str = ""


class Ack(msgspec.Struct, kw_only=True, tag="ack"):
    """Reply to a request (ROUTER/DEALER) or end-of-stream marker: `seq` is the acked message's sequence
    number (or the last one sent, for `kind="eos"`)."""
    kind: str = "ok"  # ok | error | eos
    ref_sender: str = ""
    ref_seq: int = -1
    error: str = ""
    info: dict[str, Any] = {}


class WeightBucketMeta(msgspec.Struct, kw_only=True):
    """One flat bucket of the weight broadcast: tensors of one dtype, at byte `offsets` (256-byte aligned)."""
    index: int
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    nbytes: int
    names: list[str]
    shapes: list[list[int]]
    offsets: list[int]


class WeightsMeta(msgspec.Struct, kw_only=True):
    """The weight-sync handshake, published by the learner before the broadcast. The weights code writes it
    with the stdlib (`transport.buckets.Layout.to_json`), so the NCCL path needs no msgspec; this type decodes
    the same JSON (`msgspec.json.decode(data, type=WeightsMeta)`)."""
    version: int
    round: int
    bucket_bytes: int
    buckets: list[WeightBucketMeta]


class StepReport(msgspec.Struct, kw_only=True, tag="step_report"):
    """An actor's account of one step: what it sent, for the controller's checks (e.g. sent == received)."""
    step: int
    version: int
    role: str  # rollout | verifier | buffer | learner
    actor: str
    sent: int = 0  # messages sent on the data channel this step (last seq + 1 - first seq)
    num_trajectories: int = 0
    num_tokens: int = 0
    seconds: float = 0.0
    metrics: dict[str, float] = {}
    error: str = ""


Message = Union[Trajectory, VerifiedTrajectory, RolloutRequest, Ack, StepReport]


class Envelope(msgspec.Struct, array_like=True):
    """The frame around every message: `sender` (stable name, e.g. "rollout-3"), `epoch` (one per sender
    incarnation, so a restarted sender is a new stream, not duplicates), `seq` (0, 1, 2 … per sender
    incarnation; the receiver detects gaps and duplicates), `ts_ns` (wall clock at send, for latency)."""
    sender: str
    epoch: int
    seq: int
    ts_ns: int
    body: Message
