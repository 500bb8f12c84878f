"""Chunked token logprobs (one autograd function, logits recomputed in backward) vs a float64 log_softmax."""
from __future__ import annotations

import pytest
import torch

from npr_async.training.logprobs import token_logprobs


def case(n=37, d=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    coef = torch.randn(n, generator=g)  # a non-uniform upstream gradient, as a loss gives
    return hidden, weight, targets, coef


def reference(hidden, weight, targets, coef):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    lp = torch.log_softmax(h @ w.T, -1).gather(-1, targets[:, None])[:, 0]
    (lp * coef.double()).sum().backward()
    return lp.detach(), h.grad, w.grad


def ours(hidden, weight, targets, coef, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = token_logprobs(h, w, targets, **kw)
    (lp * coef).sum().backward()
    return lp.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 8, 37, 4096])  # one row, ragged last chunk, exact, one chunk
def test_values_and_gradients_match_float64_log_softmax(chunk):
    hidden, weight, targets, coef = case()
    want_lp, want_h, want_w = reference(hidden, weight, targets, coef)
    lp, gh, gw = ours(hidden, weight, targets, coef, chunk=chunk)
    assert lp.dtype == gh.dtype == gw.dtype == torch.float32
    assert float(want_lp.min()) < -3.0  # far from uniform: the check is not between near-constants
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(gh.double(), want_h, rtol=0, atol=2e-5)
    torch.testing.assert_close(gw.double(), want_w, rtol=0, atol=2e-5)


def test_no_grad_and_empty():
    hidden, weight, targets, _ = case(n=9)
    with torch.no_grad():
        lp = token_logprobs(hidden, weight, targets, chunk=4)
    torch.testing.assert_close(lp, torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None])[:, 0])
    empty = token_logprobs(hidden[:0].requires_grad_(), weight, targets[:0])
    assert empty.shape == (0,)


def test_autocast_casts_once_and_keeps_fp32_weight_gradients():
    hidden, weight, targets, coef = case(n=20, d=32, vocab=64)
    want_lp, want_h, want_w = reference(hidden, weight, targets, coef)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = token_logprobs(h, w, targets, chunk=6)
    (lp * coef).sum().backward()
    assert lp.dtype == torch.float32 and w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    # bf16 inputs: agreement to bf16 precision only, yet far closer than the values' scale
    torch.testing.assert_close(lp.double(), want_lp, rtol=0.02, atol=0.1)
    err = (w.grad.double() - want_w).norm() / want_w.norm()
    assert float(err) < 0.02


def test_bad_arguments():
    hidden, weight, targets, _ = case(n=4)
    with pytest.raises(ValueError, match="chunk"):
        token_logprobs(hidden, weight, targets, chunk=0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:3])
