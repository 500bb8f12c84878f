"""engine/triton_sampling.py on the GPU: greedy rows vs argmax, logprobs vs log_softmax, the sampled law vs the
exact softmax (one chunk and many chunks per row), determinism in the seed. Skipped without CUDA."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def draws(x, t, seed):
    from engine.triton_sampling import gumbel_sample

    return gumbel_sample(x, t, torch.tensor([seed], device="cuda"))


def test_greedy_rows_and_logprobs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 151936, device="cuda", generator=gen) * 3
    t = torch.tensor([0.0, 1.0, 0.7, 1.3] * 9 + [0.0], device="cuda")
    tok, lp = draws(x, t, 5)
    greedy = t == 0
    assert torch.equal(tok[greedy], x[greedy].argmax(-1))
    ref = (x / torch.where(greedy, 1.0, t)[:, None]).log_softmax(-1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp, ref, rtol=0, atol=2e-5)
    tok2, lp2 = draws(x.bfloat16(), t, 5)  # bf16 logits read as they are
    assert torch.equal(tok2[greedy], x.bfloat16()[greedy].argmax(-1))


@pytest.mark.parametrize("vocab,temp", [(3000, 1.0), (151936, 0.8)])
def test_sampled_law_matches_softmax(vocab, temp):
    """64 identical rows x 60 seeds = 3840 draws; frequencies within 4.5 sigma of softmax(x / T) for tokens
    placed in different vocabulary chunks, and the rest of the vocabulary together."""
    x = torch.full((vocab,), -30.0, device="cuda")
    picks = torch.tensor([3, vocab // 3, vocab // 2 + 7, vocab - 1], device="cuda")
    x[picks] = torch.tensor([1.5, 0.5, 0.0, 1.0], device="cuda")
    x[11:200] = -2.0  # a tail of small tokens together
    rows = x.expand(64, vocab).contiguous()
    t = torch.full((64,), temp, device="cuda")
    seen = torch.cat([draws(rows, t, s)[0] for s in range(60)])
    p = (x / temp).softmax(-1)
    n = seen.numel()
    cases = [(seen[:, None] == picks).float().mean(0), p[picks]]
    tail = ((seen >= 11) & (seen < 200)).float().mean()[None], p[11:200].sum()[None]
    for got, want in (cases, tail):
        sigma = (want * (1 - want) / n).sqrt()
        assert ((got - want).abs() <= 4.5 * sigma + 1e-4).all(), (got, want)


def test_seed_determinism():
    x = torch.randn(8, 50000, device="cuda")
    t = torch.ones(8, device="cuda")
    a, b, c = draws(x, t, 1), draws(x, t, 1), draws(x, t, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
