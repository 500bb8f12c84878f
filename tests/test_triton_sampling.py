"""engine/triton_sampling.py on the GPU: greedy rows vs argmax, logprobs vs log_softmax, the sampled law vs the
exact softmax (one chunk and many chunks per row), determinism in the seed; the inverse-CDF draw of
`engine.sampler` against its torch passes and a float64 CDF. Skipped without CUDA."""
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


def cdf_vs_torch(x, t, hot, u):
    """(fused tokens, logprobs), (torch tokens, logprobs) of `engine.sampler.draw` for unfiltered rows."""
    from engine import sampler
    from engine.triton_sampling import inverse_cdf_sample

    b = x.shape[0]
    one = torch.ones(b, device=x.device)
    f = torch.stack([t, one, 0 * one, one, hot, u])
    return inverse_cdf_sample(x, t, hot, u), sampler.draw(x.clone().cpu(), f.cpu(), f.cpu().numpy())


@pytest.mark.parametrize("rows,vocab", [(1, 151936), (37, 151936), (256, 151936), (300, 151936), (5, 3000)])
def test_inverse_cdf_draw_matches_the_torch_passes(rows, vocab):
    """Tokens where a float64 CDF crosses u (within float32 summation error), nearly always the torch draw's;
    greedy rows take the first argmax, as torch; logprobs of the drawn token within 1e-4 of float64. Both chunk
    sizes (up to 256 rows and above), u not 16-byte aligned (the kernels do not assume it)."""
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, vocab, device="cuda", generator=gen) * 3
    x[:, 5] = x[:, 9] = x.max()  # a tie for the argmax: the first column wins
    t = torch.tensor([1.0, 0.7, 1.0, 1.3], device="cuda").repeat(rows)[:rows]
    hot = torch.tensor([1.0, 1.0, 0.0, 1.0], device="cuda").repeat(rows)[:rows]
    u = torch.rand(rows + 1, device="cuda", generator=gen)[1:]  # 4 bytes in, as the sampler's rows may be
    (tok, lp), (ref_tok, ref_lp) = cdf_vs_torch(x, t, hot, u)
    tok, lp = tok.cpu(), lp.cpu()
    greedy = hot.cpu() == 0
    assert torch.equal(tok[greedy], ref_tok[greedy])
    # a uniform within float32 summation error of a boundary may take the neighbour (the CDF check below holds)
    assert (tok == ref_tok).float().mean() >= 0.9
    assert (tok[greedy] == 5).all()
    logp = (x.double() / t.double()[:, None]).log_softmax(-1).cpu()
    torch.testing.assert_close(lp.double(), logp.gather(1, tok[:, None])[:, 0], rtol=0, atol=1e-4)
    cdf = logp.exp().cumsum(-1)
    below = torch.where(tok > 0, cdf.gather(1, (tok - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    hot_rows = ~greedy
    assert (below[hot_rows] <= u.cpu().double()[hot_rows] + 1e-5).all()
    assert (cdf.gather(1, tok[:, None])[:, 0][hot_rows] >= u.cpu().double()[hot_rows] - 1e-5).all()


def test_inverse_cdf_edges_and_masked_columns():
    """u = 0 takes the first column with mass, u just below 1 the last one; -inf columns are never drawn."""
    from engine.triton_sampling import inverse_cdf_sample

    x = torch.randn(3, 40000, device="cuda")
    x[:, :3] = x[:, -2:] = float("-inf")
    one = torch.ones(3, device="cuda")
    tok, lp = inverse_cdf_sample(x, one, one, torch.tensor([0.0, 0.99999994, 0.5], device="cuda"))
    assert tok[0] == 3 and tok[1] == 40000 - 3 and 3 <= tok[2] < 40000 - 2
    assert torch.isfinite(lp).all()
    with pytest.raises(ValueError, match="inverse_cdf_sample"):
        inverse_cdf_sample(x, one[:2], one, one)


def test_batch_sampler_on_the_gpu_draws_what_it_draws_on_the_cpu():
    """`engine.sampler.sample` (penalties, temperatures, greedy rows, per-row keys) through the fused kernels on
    the GPU gives the CPU's tokens and logprobs; a filtered batch keeps the torch passes on both."""
    from engine.sampler import SamplingParams, sample

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(24, 5000, generator=gen) * 2
    params = [SamplingParams(temperature=[0.0, 1.0, 0.8][i % 3], repetition_penalty=[1.0, 1.1][i % 2], seed=i)
              for i in range(24)]
    keys = [(i, 100 + i) for i in range(24)]
    seen = [list(range(i, i + 40)) for i in range(24)]
    for ps in (params, [SamplingParams(temperature=1.0, top_p=0.9, seed=1)] * 24):
        cpu = sample(logits, ps, keys, seen)
        gpu = sample(logits.cuda(), ps, keys, seen)
        assert torch.equal(gpu[0].cpu(), cpu[0])
        torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=0, atol=1e-5)
