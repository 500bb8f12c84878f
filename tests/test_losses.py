"""Losses against hand-computed values: sft, papo (one batch std, structural filter), dapo (clip, overlong)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npr_async.config import LearnerConfig
from npr_async.training.losses import LOSSES, Loss, Totals, get_loss, overlong_penalty, register_loss
from npr_async.training.packing import Sample


def sample(n_loss: int, reward: float = 0.0, finish_reason: str = "stop", length: int = 0) -> Sample:
    n = n_loss + 1
    return Sample(np.zeros(n, np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32), [[]],
                  np.r_[False, np.ones(n_loss, bool)], None,
                  {"reward": reward, "finish_reason": finish_reason, "length": length})


def run(loss: Loss, groups: list[list[Sample]], logp: list[float], old: list[float] | None = None):
    """Apply the loss the way the trainer does; returns (scaled loss value, d loss / d logp)."""
    totals, kept = Totals(), []
    for g in groups:
        g = [s for s in g if loss.keep(s)]
        loss.prepare_group(g)
        totals.add(g)
        kept += g
    coef = torch.tensor([s.meta["coef"] for s in kept for _ in range(int(s.loss_mask.sum()))], dtype=torch.float64)
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    old_t = torch.tensor(old if old is not None else [0.0] * len(logp), dtype=torch.float64)
    value = loss.token_losses(lp, old_t, coef.double()).sum() * loss.scale(totals)
    value.backward()
    return float(value.detach()), lp.grad.numpy()


def test_sft_token_mean_over_batch():
    value, grad = run(get_loss("sft", LearnerConfig()), [[sample(2), sample(1)]], [-1.0, -2.0, -3.0])
    assert value == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    np.testing.assert_allclose(grad, [-1 / 3] * 3)


def test_papo_one_batch_std_sequence_mean_and_filter():
    loss = get_loss("papo", LearnerConfig())
    g1 = [sample(2, 1.0), sample(4, -1.0), sample(1, 1.0), sample(7, -1.0, "format_error")]
    g2 = [sample(3, 1.0), sample(2, 1.0), sample(5, -1.0, "length")]
    value, grad = run(loss, [g1, g2], list(-np.arange(1, 13) / 10))
    # kept rewards 1, -1, 1 | 1, 1: group means 1/3 and 1; batch mean 0.6, unbiased var (4·0.16 + 2.56)/4 = 0.8
    a = np.array([2 / 3, -4 / 3, 2 / 3, 0, 0]) / (math.sqrt(0.8) + 1e-6)
    per_token = np.repeat(-a / np.array([2, 4, 1, 3, 2]) / 5, [2, 4, 1, 3, 2])  # token mean, then / 5 sequences
    np.testing.assert_allclose(grad, per_token, rtol=1e-12)
    assert grad[0] == pytest.approx(-(2 / 3) / 0.8944282 / 2 / 5, rel=1e-6)  # -0.0745356...
    assert value == pytest.approx(0.0, abs=1e-12)  # ratio ≡ 1: the value is −Σ A_i / N of centred rewards


def test_papo_ratio_is_one_whatever_the_engine_logprob():
    loss = get_loss("papo", LearnerConfig())
    _, g_same = run(loss, [[sample(1, 1.0), sample(1, -1.0)]], [-0.5, -0.5], [-0.5, -0.5])
    _, g_off = run(loss, [[sample(1, 1.0), sample(1, -1.0)]], [-0.5, -0.5], [-9.0, 3.0])  # no clip, no ratio
    np.testing.assert_array_equal(g_same, g_off)


def test_dapo_decoupled_clip_token_mean():
    loss = get_loss("dapo", LearnerConfig())
    ratios = [1.5, 1.1, 0.5, 0.5, 1.5]  # sample 0 (r=+1): 3 tokens, sample 1 (r=-1): 2 tokens
    value, grad = run(loss, [[sample(3, 1.0), sample(2, -1.0)]], list(np.log(ratios)))
    a = 1 / (math.sqrt(2) + 1e-6)  # group std (unbiased) of ±1 is √2
    # A>0: r=1.5 clipped at 1.28, r=1.1 inside, r=0.5 below 1-0.2 but min() keeps the unclipped -0.5A
    # A<0: r=0.5 clipped at 0.8, r=1.5 above 1.28 but max keeps the unclipped 1.5A
    assert value == pytest.approx(a * (-1.28 - 1.1 - 0.5 + 0.8 + 1.5) / 5, rel=1e-9)
    np.testing.assert_allclose(grad, np.array([0, -1.1 * a, -0.5 * a, 0, 1.5 * a]) / 5, rtol=1e-9, atol=1e-15)


def test_dapo_overlong_penalty():
    assert [overlong_penalty(n, 100, 20, 1.0) for n in (70, 80, 90, 100, 101)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(95, 100, 0, 1.0) == 0.0  # buffer 0: off
    cfg = LearnerConfig(overlong_buffer=20, overlong_max_tokens=100)
    loss = get_loss("dapo", cfg)
    s = [sample(1, 1.0, length=50), sample(1, 1.0, length=90)]
    loss.prepare_group(s)
    a = 0.25 / (math.sqrt(0.125) + 1e-6)  # 0.7071: shaped rewards 1 and 0.5: centred ±0.25, std √0.125
    assert [x.meta["coef"] for x in s] == pytest.approx([a, -a])
    with pytest.raises(ValueError, match="overlong_max_tokens"):
        get_loss("dapo", LearnerConfig(overlong_buffer=20))


class _Doubled(Loss):
    def token_losses(self, logp, old_logp, coef):
        return -2 * logp

    def scale(self, totals):
        return 1.0 / totals.num_sequences


def test_user_loss_by_name_and_dotted_path():
    register_loss("test-doubled")(_Doubled)
    try:
        value, grad = run(get_loss("test-doubled", LearnerConfig()), [[sample(2), sample(1)]], [-1.0, -1.0, -1.0])
        assert value == pytest.approx(3.0) and np.allclose(grad, -1.0)
        assert isinstance(get_loss(f"{__name__}:_Doubled", LearnerConfig()), _Doubled)
    finally:
        LOSSES.pop("test-doubled")
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("nope", LearnerConfig())
