"""Every wire type round-trips through the one Envelope decoder; arrays stay raw bytes."""
import msgspec
import numpy as np
import pytest
import torch

from npr_async.messages import (Ack, Envelope, Prompt, RolloutRequest, SamplingSpec, StepReport, Trajectory,
                                VerifiedTrajectory, WeightsMeta)
from npr_async.transport import buckets
from npr_async.transport.zmq import decode, encode


def make_traj(n=8, prompt_id="p0", sample_idx=0, version=3):
    return Trajectory.build(token_ids=np.arange(n), positions=np.arange(n), segment_ids=np.zeros(n),
                            parents=[[]], logprobs=np.linspace(-1, 0, n), sampled=np.arange(n) % 2 == 0,
                            prompt_id=prompt_id, sample_idx=sample_idx, version=version, prompt_len=2,
                            finish_reason="stop", text="x" * n)


BODIES = [
    make_traj(),
    VerifiedTrajectory(trajectory=make_traj(), reward=1.0, correct=True, verifier="math",
                       details={"answer": "42", "seconds": 0.01}),
    RolloutRequest(step=2, version=2, prompts=[Prompt(prompt_id="a", text="1+1?",
                   token_ids=np.array([5, 6], np.int32).tobytes(), task={"answer": "2"})],
                   sampling=SamplingSpec(temperature=0.7, seed=1), samples_per_prompt=4),
    Ack(kind="error", ref_sender="ctl", ref_seq=9, error="boom"),
    StepReport(step=1, version=1, role="rollout", actor="rollout-0", sent=16, metrics={"tok_s": 1e3}),
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_envelope_roundtrip(body):
    env = decode(encode(Envelope("s", 7, 3, 123, body)))
    assert (env.sender, env.epoch, env.seq, env.ts_ns) == ("s", 7, 3, 123)
    assert type(env.body) is type(body) and env.body == body


def test_arrays_are_raw_bytes_and_views_match():
    t = decode(encode(Envelope("s", 0, 0, 0, make_traj(5)))).body
    assert isinstance(t.token_ids, bytes) and t.ids().tolist() == [0, 1, 2, 3, 4]
    assert t.sampled_mask().tolist() == [True, False, True, False, True]
    assert RolloutRequest(step=0, version=0, prompts=[BODIES[2].prompts[0]]).prompts[0].ids().tolist() == [5, 6]


def test_untagged_trajectory_bytes_still_decode():
    # Trajectories written before the tag existed (no "type" key) still decode as a Trajectory.
    raw = msgspec.msgpack.encode({k: v for k, v in msgspec.structs.asdict(make_traj()).items()})
    assert msgspec.msgpack.decode(raw, type=Trajectory) == make_traj()


def test_unknown_tag_is_a_validation_error():
    raw = msgspec.msgpack.encode(["s", 0, 0, 0, {"type": "nope"}])
    with pytest.raises(msgspec.ValidationError, match="nope"):
        decode(raw)


def test_weights_layout_json_decodes_as_weights_meta():
    params = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.zeros(7), "c": torch.zeros(2, dtype=torch.bfloat16)}
    layout = buckets.plan(params, bucket_bytes=64, version=4, round=1)
    meta = msgspec.json.decode(layout.to_json(), type=WeightsMeta)
    assert meta.version == 4 and meta.round == 1
    assert [(b.dtype, b.names) for b in meta.buckets] == [("bfloat16", ["a"]), ("bfloat16", ["c"]), ("float32", ["b"])]
    assert buckets.Layout.from_json(layout.to_json()) == layout
