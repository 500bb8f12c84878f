"""The replay buffer's accounting: exactly once per (prompt, sample), one weight version, whole groups."""
import random

import pytest

from npr_async.groups import StepGroups
from npr_async.messages import Trajectory, VerifiedTrajectory


def verified(prompt_id, idx, version=3, reward=1.0):
    traj = Trajectory.build(token_ids=[1, 2], positions=[0, 1], segment_ids=[0, 0], parents=[[]],
                            logprobs=[None, -0.5], sampled=[False, True], prompt_len=1, finish_reason="stop",
                            prompt_id=prompt_id, sample_idx=idx, version=version)
    return VerifiedTrajectory(trajectory=traj, reward=reward, correct=reward > 0, verifier="math")


def test_groups_release_whole_and_in_completion_order():
    g = StepGroups(0, 3, ["a", "b"], samples_per_prompt=2)
    assert g.add(verified("b", 1)) == "accepted"
    assert g.take() == []
    g.add(verified("a", 0)); g.add(verified("b", 0))
    (group,) = g.take()
    assert [s.trajectory.prompt_id for s in group] == ["b", "b"]
    assert [s.trajectory.sample_idx for s in group] == [0, 1]
    assert not g.complete and g.missing() == {"a": [1]}
    g.add(verified("a", 1))
    assert g.complete and len(g.take()) == 1 and g.drained


def test_stale_duplicate_and_unexpected_samples_are_refused_and_counted():
    g = StepGroups(0, 3, ["a"], samples_per_prompt=2)
    assert g.add(verified("a", 0, version=2)) == "stale_dropped"
    assert g.add(verified("a", 0)) == "accepted"
    assert g.add(verified("a", 0)) == "duplicates"
    assert g.add(verified("zzz", 0)) == "unexpected"
    assert g.add(verified("a", 5)) == "unexpected"
    g.add(verified("a", 1))
    assert g.add(verified("a", 1)) == "duplicates"  # late copy after the group completed
    assert g.counts == {"accepted": 2, "stale_dropped": 1, "duplicates": 2, "unexpected": 2,
                        "groups_complete": 1, "groups_filtered": 0}


def test_dynamic_sampling_drops_groups_without_signal():
    g = StepGroups(0, 3, ["same", "mixed"], samples_per_prompt=2, dynamic_sampling=True)
    for i in range(2):
        g.add(verified("same", i, reward=1.0))
    g.add(verified("mixed", 0, reward=1.0)); g.add(verified("mixed", 1, reward=-1.0))
    assert [grp[0].trajectory.prompt_id for grp in g.take()] == ["mixed"]
    assert g.counts["groups_filtered"] == 1 and g.expected_groups == 1


def test_any_arrival_order_with_repeats_counts_every_sample_once():
    rng = random.Random(0)
    prompts = [f"p{i}" for i in range(6)]
    g = StepGroups(7, 1, prompts, samples_per_prompt=4)
    arrivals = [verified(p, i, version=1) for p in prompts for i in range(4)]
    arrivals += rng.sample(arrivals, 10)  # re-dispatched work delivers some samples twice
    rng.shuffle(arrivals)
    for a in arrivals:
        g.add(a)
    groups = g.take()
    seen = sorted((s.trajectory.prompt_id, s.trajectory.sample_idx) for grp in groups for s in grp)
    assert seen == sorted((p, i) for p in prompts for i in range(4))
    assert g.counts["accepted"] == 24 and g.counts["duplicates"] == 10


def test_repeated_prompt_ids_are_an_error():
    with pytest.raises(ValueError, match="not unique"):
        StepGroups(0, 0, ["a", "a"], 2)
