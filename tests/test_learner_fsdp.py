"""FSDP2 at world size 1 (gloo, CPU): the same gradient and step as the plain learner; checkpoints load."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from engine.loader import load_model
from npr_async.config import LearnerConfig
from npr_async.training.trainer import Trainer
from tests.learner_trees import random_trajectory, tiny_model


@pytest.fixture
def group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_fsdp_world_size_one_matches_plain(group, tmp_path):
    trajs = [random_trajectory(500 + i, prompt_id="q") for i in range(4)]
    rewards = [1.0, -1.0, 0.5, -1.0]
    base = tiny_model(8)
    results = []
    for fsdp in (False, True):
        tr = Trainer(copy.deepcopy(base), LearnerConfig(loss="papo", lr=1e-2, fsdp=fsdp, micro_batch_tokens=200))
        tr.accumulate(trajs[:2], rewards[:2])
        tr.accumulate(trajs[2:], rewards[2:])
        m = tr.finish_step()
        results.append((m, {n: w.clone() for n, w in tr.named_weights()}))
        if fsdp:
            tr.save(tmp_path / "ck")
            b = Trainer(load_model(tmp_path / "ck"), LearnerConfig(loss="papo", fsdp=True))
            b.load(tmp_path / "ck")
            assert b.step == 1
            for (n, w), (_, w2) in zip(tr.named_weights(), b.named_weights()):
                assert torch.equal(w, w2), n
    (m0, w0), (m1, w1) = results
    assert m0["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    for n in w0:
        torch.testing.assert_close(w1[n], w0[n], rtol=0, atol=1e-6, msg=n)
