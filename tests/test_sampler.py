"""engine/sampler.py: distributions, filters, penalty (vs HF), counter-based draws, batch independence,
determinism, and the engine's BatchSampler (device-side own-token table) against the plain function."""
from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from engine.npr_tree import Branch, Fork
from engine.sampler import (BatchSampler, SamplingParams, apply_repetition_penalty, branch_seed, sample,
                            sampling_logprobs, uniforms)
from npr_async.config import EngineConfig, SamplingConfig


def brute_force_logprobs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The sampling distribution of one row, written the slow obvious way."""
    x = logits.astype(np.float64) / (temperature or 1.0)
    keep = np.ones(len(x), dtype=bool)
    if temperature and top_k:
        keep &= x >= np.sort(x)[::-1][min(top_k, len(x)) - 1]
    if temperature and top_p < 1:
        p = np.where(keep, np.exp(x - x.max()), 0.0)
        p /= p.sum()
        mass = 0.0
        for i in np.argsort(-x, kind="stable"):
            if keep[i]:
                if mass >= top_p:
                    keep[i] = False
                mass += p[i]
    z = np.where(keep, x, -np.inf)
    return z - (np.log(np.exp(z[keep] - z[keep].max()).sum()) + z[keep].max())


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (0.9, 5, 0.85)])
def test_draws_follow_the_target_distribution(t, k, p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0])
    target = np.exp(brute_force_logprobs(logits.numpy(), t, k, p))
    n = 20000
    params = [SamplingParams(temperature=t, top_k=k, top_p=p)] * n
    tokens, logprobs = sample(logits.expand(n, -1), params, [(1234, i) for i in range(n)])
    counts = np.bincount(tokens.numpy(), minlength=len(logits))
    assert counts[target == 0].sum() == 0  # never a filtered token
    live = target > 0
    chi2 = (((counts - n * target) ** 2)[live] / (n * target[live])).sum()
    assert chi2 < 26.1, (chi2, counts, n * target)  # 26.1: p = 0.0005 at 7 degrees of freedom (at most)
    torch.testing.assert_close(logprobs, torch.tensor(np.log(target[tokens.numpy()]), dtype=torch.float32),
                               atol=1e-5, rtol=1e-5)


def test_filters_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    b, v = 64, 40
    logits = torch.randn(b, v, generator=gen) * 3
    logits[:8, :10] = logits[:8, :1]  # ties at the top-k boundary are kept
    temp = torch.rand(b, generator=gen) * 2
    temp[::7] = 0.0  # greedy rows: unfiltered log-softmax at T=1
    top_k = torch.randint(0, 12, (b,), generator=gen)
    top_p = torch.rand(b, generator=gen).clamp(min=0.05)
    top_p[::3] = 1.0
    got = sampling_logprobs(logits, temp, top_k, top_p)
    for i in range(b):
        want = brute_force_logprobs(logits[i].numpy(), float(temp[i]), int(top_k[i]), float(top_p[i]))
        assert np.array_equal(np.isfinite(want), torch.isfinite(got[i]).numpy()), i
        np.testing.assert_allclose(got[i].numpy()[np.isfinite(want)], want[np.isfinite(want)], atol=1e-5)


def test_repetition_penalty_matches_hf():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=gen) * 2
    seen = torch.randint(0, 50, (3, 12), generator=gen)  # repeats included
    pens = [1.02, 1.5, 0.8]
    ours = apply_repetition_penalty(logits.clone(), [s.tolist() for s in seen], pens)
    for i, pen in enumerate(pens):
        hf = RepetitionPenaltyLogitsProcessor(penalty=pen)(seen[i:i + 1], logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i], hf[0], atol=0, rtol=0)
    # through sample(): greedy takes the argmax of the penalised logits; default penalty comes from params
    x = torch.tensor([[3.0, 2.9, -1.0]])
    tok, lp = sample(x, [SamplingParams(temperature=0, repetition_penalty=1.1)], [None], [[0]])
    assert tok.item() == 1
    assert lp.item() == pytest.approx(torch.tensor([3.0 / 1.1, 2.9, -1.0]).log_softmax(-1)[1].item(), abs=1e-6)
    tok, _ = sample(x, [SamplingParams(temperature=0, repetition_penalty=1.1)], [None], [[0]], penalties=[1.0])
    assert tok.item() == 0  # an explicit per-row penalty (the engine's branch penalty) overrides params


def test_plain_sampling_logprob_is_model_logsoftmax_and_greedy_is_argmax():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 100, generator=gen) * 4
    params = [SamplingParams(temperature=1.0)] * 3 + [SamplingParams(temperature=0.0)] * 3
    keys = [(branch_seed(7, i), 0) for i in range(3)] + [None] * 3
    tok, lp = sample(logits, params, keys)
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(lp, ref.gather(1, tok[:, None])[:, 0], atol=1e-6, rtol=0)
    assert torch.equal(tok[3:], logits[3:].argmax(-1))
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32


def _run(rows, steps, vocab=5000):
    """Decode `steps` tokens for rows [(seed, branch, params)] with shared logits per step; per-row outputs."""
    out = [[] for _ in rows]
    for step in range(steps):
        logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(100 + step)) * 3
        keys = [(branch_seed(s, br), step) if p.temperature > 0 else None for s, br, p in rows]
        tok, lp = sample(logits.expand(len(rows), -1), [p for *_, p in rows], keys,
                         [o and [t for t, _ in o] for o in out], [p.branch_repetition_penalty for *_, p in rows])
        for i in range(len(rows)):
            out[i].append((tok[i].item(), lp[i].item()))
    return out


def test_batch_independence_and_determinism():
    me = (42, (1, 2), SamplingParams(temperature=0.8, top_p=0.9, top_k=50))
    alone = _run([me], 30)[0]
    others = [(1, (), SamplingParams(temperature=1.2)), (2, (0,), SamplingParams(temperature=0.0)),
              (42, (1, 3), SamplingParams(top_k=3, branch_repetition_penalty=1.3))]
    crowded = _run(others[:2] + [me] + others[2:], 30)
    assert crowded[2] == alone  # same tokens and logprobs whatever the batch around it
    assert _run([me], 30)[0] == alone  # same seed -> same draws
    sibling = crowded[3]  # same request seed, another branch: its own stream
    assert [t for t, _ in sibling] != [t for t, _ in alone]
    assert len({t for t, _ in alone}) > 5  # actually random, not stuck


def test_params_validation_defaults_and_wire():
    p = SamplingParams()
    e, s = EngineConfig(), SamplingConfig()
    assert (p.temperature, p.top_p, p.top_k, p.max_total_tokens, p.branch_repetition_penalty, p.parallel) == (
        s.temperature, s.top_p, s.top_k, e.max_total_tokens, e.branch_repetition_penalty, e.parallel)
    q = SamplingParams.from_config(EngineConfig(max_step_tokens=7, parallel=False), SamplingConfig(top_p=0.7), seed=3)
    assert (q.max_step_tokens, q.parallel, q.top_p, q.seed) == (7, False, 0.7, 3)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(q), type=SamplingParams) == q
    for bad, field in [(dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
                       (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
                       (dict(repetition_penalty=0.0), "repetition_penalty"),
                       (dict(temperature=math.nan), "temperature"), (dict(max_plans=0), "max_plans")]:
        with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="no key"):
        sample(torch.zeros(1, 4), [SamplingParams()], [None])
    with pytest.raises(ValueError, match="rows"):
        sample(torch.zeros(2, 4), [SamplingParams()], [None])


def test_uniforms_are_counter_based_and_uniform():
    seeds = np.array([branch_seed(3, ()), branch_seed(3, (5, 1)), branch_seed(4, ())], dtype=np.uint64)
    u = uniforms(np.repeat(seeds, 4000), np.tile(np.arange(4000), 3))
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    assert np.array_equal(u * 2**23, np.floor(u * 2**23))  # 23 bits: u * total < total in float32
    # a (seed, counter) pair gives the same number alone, in any batch, in any order
    assert uniforms([seeds[1]], [17])[0] == u[4000 + 17] == uniforms(seeds[::-1], [0, 17, 0])[1]
    for row in u.reshape(3, 4000):  # each stream and the streams between them look uniform and distinct
        counts = np.bincount((row * 20).astype(int), minlength=20)
        assert ((counts - 200) ** 2 / 200).sum() < 50  # chi2, 19 dof: p ~ 1e-4
    assert np.abs(np.corrcoef(u.reshape(3, 4000))[np.triu_indices(3, 1)]).max() < 0.06
    total = np.float32(np.random.default_rng(0).uniform(0.5, 2.0, 10000)).astype(np.float32)
    assert (np.float32(1 - 2.0 ** -23) * total < total).all()  # the largest u never reaches the total


class _Req:
    def __init__(self, seed, params):
        self.seed, self.params = seed, params


class _Item:
    def __init__(self, req, branch):
        self.req, self.sample = req, branch


def test_batch_sampler_matches_sample_and_is_batch_independent():
    """BatchSampler (own tokens on the device, rows given out and taken back, table growth) draws exactly what
    `sample` draws from the same branch seeds, positions, penalties and own-token lists, alone or crowded."""
    vocab = 300
    params = [SamplingParams(temperature=1.0, seed=1, branch_repetition_penalty=1.3, repetition_penalty=1.1),
              SamplingParams(temperature=0.7, top_p=0.8, branch_repetition_penalty=1.0),
              SamplingParams(temperature=0.0, repetition_penalty=1.5),
              SamplingParams(temperature=1.2, top_k=7, branch_repetition_penalty=0.8)]

    def branches(n):  # n requests x (a trunk and two steps of one fork)
        out = []
        for r in range(n):
            req = _Req(100 + r, params[r % len(params)])
            trunk = Branch(0, [0], 10)
            fork = Fork(trunk, 0, 10, 2)
            out += [(req, trunk)] + [(req, Branch(k, [0, k], 10, fork, path=(10, k))) for k in (1, 2)]
        return out

    def run(rows, steps, sampler):
        out = {id(b): [] for _, b in rows}
        for step in range(steps):
            live = [(q, b) for i, (q, b) in enumerate(rows) if step < 40 + 7 * (i % 5)]  # rows end at times
            if not live:
                break
            logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(step)) * 3
            pens = [q.params.branch_repetition_penalty if b.fork else q.params.repetition_penalty for q, b in live]
            want = sample(logits.expand(len(live), -1), [q.params for q, _ in live],
                          [(branch_seed(q.seed, b.path), b.next_pos) if q.params.temperature > 0 else None
                           for q, b in live], [b.own for _, b in live], pens)
            tok, lp = sampler(logits.expand(len(live), -1).clone(), [_Item(q, b) for q, b in live])
            assert tok == want[0].tolist() and np.allclose(lp, want[1].numpy(), atol=1e-6, rtol=0)
            for (q, b), t, p in zip(live, tok, lp):
                b.own.append(t)
                b.next_pos += 1
                out[id(b)].append((t, p))
                if step + 1 == 40 + 7 * (rows.index((q, b)) % 5):
                    sampler.release([b])
        return [out[id(b)] for _, b in rows]

    crowd = branches(40)  # 120 rows: the own-token table grows past 64 rows and 256 columns
    s = BatchSampler("cpu")
    got = run(crowd, 80, s)
    assert s.seen.shape[0] > 64
    alone = branches(1)
    assert run(alone, 80, BatchSampler("cpu")) == got[:3]  # same seeds, branches and positions as crowd's first
    s.reset()
    wide = branches(1)
    for _, b in wide:
        b.own = [t % vocab for t in range(5, 305)]  # a branch that arrives with 300 own tokens (its row was released)
    run(wide, 3, s)
    assert s.seen.shape[1] > 300
