"""Fused GPU sampling: one read of the logits, no [B, V] temporaries. `gumbel_sample` for the CUDA-graph
decode step; `inverse_cdf_sample` for the engine loop's `BatchSampler` (its counter-based uniforms, at the end).

Gumbel-max over softmax(logits / T): token = argmax(logits / T - log(-log u)), u uniform from Philox keyed by
a seed read from device memory (a graph replay draws fresh numbers when the seed tensor is bumped inside the
graph), one Philox evaluation giving the uniforms of 4 columns of a row. T == 0 rows take the argmax of the
logits and report the logprob under the T = 1 law (as `engine.cuda_graphs.sample`, the torch reference). Two
launches: programs over (row, vocab chunk) keep an online max / sum-exp and the best race of their chunk; one
program per row merges the chunks and computes the logprob. Logits may be bf16 (the LM head's own output: the
float32 copy would hold the same values). At [256, 151936] float32 logits with one Philox evaluation per
column it took 0.25 ms on an H200, where the compiled torch version (softmax, race, argmax, gather in one
Inductor reduction) took 3.1 ms and eager ~0.7 ms.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns per step of a program
# Per-row pointers are not specialised on 16-byte alignment: the partials' rows start b * nchunk floats in and the
# engine's uniforms 5 * b floats in, so their alignment followed the row count b and each new class compiled in
# the middle of a rollout call (BENCHMARKS.md, session 16). Each program loads a scalar or a few floats there.
ROW_PTRS = ["t_ptr", "m_ptr", "s_ptr", "r_ptr", "i_ptr", "hot_ptr", "u_ptr", "tok_ptr", "lp_ptr"]


def split(v: int, b: int, block: int) -> tuple[int, int]:
    """(chunk, nchunk): the columns of a [b, v] launch in chunks of 4 blocks up to 256 rows, 8 above (whole steps
    of the Gumbel race, which draws 4 blocks' uniforms at a time). On an H200 at [b, 151936] float32 that came
    within 2% of the best of 1..48 chunks a row at every b from 1 to 2048, where the earlier count falling with b
    (1024 / b programs) took up to 2.5x as long (BENCHMARKS.md, session 16); and two launch configurations cover
    every b, compiled when the engine sets up (engine/jit_warmup.py)."""
    chunk = (4 if b <= 256 else 8) * block
    return chunk, triton.cdiv(v, chunk)


@triton.jit
def _lanes(x_ptr, row, col, V, stride_x, inv_t, u, m, s, best, best_i, HOT: tl.constexpr):
    """One BLOCK of columns into the per-lane state: online log-sum-exp (m, s) and the best race (HOT) or the
    best logit (greedy; u unused)."""
    ok = col < V
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + col, mask=ok, other=float("-inf")).to(tl.float32) * inv_t
    m_new = tl.maximum(m, x)
    live = x > float("-inf")
    s = s * tl.exp(tl.where(m_new > float("-inf"), m - m_new, 0.0)) + tl.where(live, tl.exp(x - m_new), 0.0)
    if HOT:  # Philox's float can round to 1.0 (then -log(-log u) = +inf would pick a uniform token): cap it
        race = tl.where(ok, x - tl.log(-tl.log(tl.minimum(u, 0.99999994))), float("-inf"))
    else:
        race = x
    take = race > best  # strict: the first column wins ties within a lane
    return m_new, s, tl.where(take, race, best), tl.where(take, col, best_i)


@triton.jit(do_not_specialize_on_alignment=ROW_PTRS)
def _chunk_kernel(x_ptr, t_ptr, seed_ptr, m_ptr, s_ptr, r_ptr, i_ptr, V, stride_x,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr, NCHUNK: tl.constexpr, RACE: tl.constexpr):
    """Per (row, chunk) of x / T: the online max and sum-exp, and the best race (RACE and T > 0: Gumbel-max,
    seeded from seed_ptr) or the first argmax."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(t_ptr + row)
    inv_t = tl.where(t > 0, 1.0 / tl.where(t > 0, t, 1.0), 1.0)
    hot = False  # without RACE the race's code is not compiled (and seed_ptr not read)
    if RACE:
        hot = t > 0
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_i = tl.zeros((BLOCK,), tl.int32)
    lane = tl.arange(0, BLOCK)
    if hot:
        seed = tl.load(seed_ptr)
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, 4 * BLOCK):
            # one Philox evaluation gives the uniforms of 4 columns; counters are unique per (row, column < V)
            u0, u1, u2, u3 = tl.rand4x(seed, row.to(tl.int64) * tl.cdiv(V, 4 * BLOCK) * BLOCK + start // 4 + lane)
            m, s, best, best_i = _lanes(x_ptr, row, start + lane, V, stride_x, inv_t, u0, m, s, best, best_i, True)
            m, s, best, best_i = _lanes(x_ptr, row, start + BLOCK + lane, V, stride_x, inv_t, u1, m, s, best,
                                        best_i, True)
            m, s, best, best_i = _lanes(x_ptr, row, start + 2 * BLOCK + lane, V, stride_x, inv_t, u2, m, s, best,
                                        best_i, True)
            m, s, best, best_i = _lanes(x_ptr, row, start + 3 * BLOCK + lane, V, stride_x, inv_t, u3, m, s, best,
                                        best_i, True)
    else:  # greedy rows draw nothing
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
            m, s, best, best_i = _lanes(x_ptr, row, start + lane, V, stride_x, inv_t, 0.0, m, s, best, best_i, False)
    mc = tl.max(m, 0)
    sc = tl.sum(s * tl.exp(tl.where(m > float("-inf"), m - mc, float("-inf"))), 0)
    bc = tl.max(best, 0)
    ic = tl.min(tl.where(best == bc, best_i, 2147483647), 0)  # the lowest column among equal races
    o = row * NCHUNK + chunk
    tl.store(m_ptr + o, mc)
    tl.store(s_ptr + o, sc)
    tl.store(r_ptr + o, bc)
    tl.store(i_ptr + o, ic)


@triton.jit
def _chunk_masses(m_ptr, s_ptr, row, NCHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """A row's chunks as one merge reads them: (chunk index c, valid mask, offsets, the row's max, each chunk's
    mass relative to exp(max))."""
    c = tl.arange(0, BLOCK_C)
    ok = c < NCHUNK
    o = row * NCHUNK + c
    m = tl.load(m_ptr + o, mask=ok, other=float("-inf"))
    s = tl.load(s_ptr + o, mask=ok, other=0.0)
    mm = tl.max(m, 0)
    return c, ok, o, mm, tl.where(m > float("-inf"), s * tl.exp(m - mm), 0.0)


@triton.jit
def _best_of_chunks(r_ptr, i_ptr, o, ok):
    """The column of the best chunk value (race or logit), the lowest among equals."""
    r = tl.load(r_ptr + o, mask=ok, other=float("-inf"))
    i = tl.load(i_ptr + o, mask=ok, other=2147483647)
    return tl.min(tl.where(r == tl.max(r, 0), i, 2147483647), 0)


@triton.jit(do_not_specialize_on_alignment=ROW_PTRS)
def _merge_kernel(x_ptr, t_ptr, m_ptr, s_ptr, r_ptr, i_ptr, tok_ptr, lp_ptr, stride_x, NCHUNK: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    c, ok, o, mm, w = _chunk_masses(m_ptr, s_ptr, row, NCHUNK, BLOCK_C)
    lse = mm + tl.log(tl.sum(w, 0))
    tok = _best_of_chunks(r_ptr, i_ptr, o, ok)
    t = tl.load(t_ptr + row)
    inv_t = tl.where(t > 0, 1.0 / tl.where(t > 0, t, 1.0), 1.0)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + tok).to(tl.float32) * inv_t
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(lp_ptr + row, x - lse)


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
                  tokens: torch.Tensor | None = None, logprobs: torch.Tensor | None = None,
                  block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype, unit column stride), temperature [B] float32 (0 = greedy), seed: a
    one-element int64 device tensor (bump it between calls for fresh draws). Returns (tokens int64 [B],
    logprobs float32 [B]) in `tokens` / `logprobs` when given. Graph-safe: buffers depend only on B."""
    b, v = logits.shape
    assert logits.stride(1) == 1 and temperature.shape == (b,) and seed.numel() == 1
    dev = logits.device
    tokens = torch.empty(b, dtype=torch.long, device=dev) if tokens is None else tokens
    logprobs = torch.empty(b, dtype=torch.float32, device=dev) if logprobs is None else logprobs
    if b == 0:
        return tokens, logprobs
    chunk, nchunk = split(v, b, block)
    part = torch.empty(3, b * nchunk, dtype=torch.float32, device=dev)
    idx = torch.empty(b * nchunk, dtype=torch.int32, device=dev)
    _chunk_kernel[(b, nchunk)](logits, temperature, seed, part[0], part[1], part[2], idx, v, logits.stride(0),
                               CHUNK=chunk, BLOCK=block, NCHUNK=nchunk, RACE=True, num_warps=4)
    _merge_kernel[(b,)](logits, temperature, part[0], part[1], part[2], idx, tokens, logprobs, logits.stride(0),
                        NCHUNK=nchunk, BLOCK_C=max(16, triton.next_power_of_2(nchunk)), num_warps=1)
    return tokens, logprobs


@triton.jit(do_not_specialize_on_alignment=ROW_PTRS)
def _cdf_pick_kernel(x_ptr, t_ptr, hot_ptr, u_ptr, m_ptr, s_ptr, r_ptr, i_ptr, tok_ptr, lp_ptr, V, stride_x,
                     CHUNK: tl.constexpr, BLOCK: tl.constexpr, NCHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per row: the log-sum-exp from the chunks; a hot row finds the chunk where the running mass
    passes u * total and walks it for the first column whose inclusive cumulative mass exceeds it (torch's
    searchsorted(cdf, u * cdf[-1], right=True)); a greedy row takes the first argmax."""
    row = tl.program_id(0)
    c, ok, o, mm, w = _chunk_masses(m_ptr, s_ptr, row, NCHUNK, BLOCK_C)
    total = tl.sum(w, 0)
    inv_t = 1.0 / tl.load(t_ptr + row)
    if tl.load(hot_ptr + row) > 0:
        target = tl.load(u_ptr + row) * total
        cum = tl.cumsum(w, 0)
        first = tl.min(tl.where((cum > target) & ok, c, BLOCK_C), 0)
        # rounding can leave the target at or above the last chunk's running sum: the last chunk with mass
        cstar = tl.where(first < BLOCK_C, first, tl.max(tl.where(w > 0, c, 0), 0))
        run = tl.sum(tl.where(c < cstar, w, 0.0), 0)
        tok = V + 0  # loop-carried as int32 scalars
        last = V * 0
        lane = tl.arange(0, BLOCK)
        for start in range(0, CHUNK, BLOCK):
            col = cstar * CHUNK + start + lane
            inside = col < V
            x = tl.load(x_ptr + row.to(tl.int64) * stride_x + col, mask=inside, other=float("-inf"))
            p = tl.where(inside, tl.exp(x.to(tl.float32) * inv_t - mm), 0.0)
            cc = run + tl.cumsum(p, 0)
            tok = tl.minimum(tok, tl.min(tl.where((cc > target) & inside, col, V), 0))
            last = tl.maximum(last, tl.max(tl.where(p > 0, col, 0), 0))
            run += tl.sum(p, 0)
        tok = tl.where(tok < V, tok, last)
    else:
        tok = _best_of_chunks(r_ptr, i_ptr, o, ok)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + tok).to(tl.float32) * inv_t
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(lp_ptr + row, x - mm - tl.log(total))


def inverse_cdf_sample(logits: torch.Tensor, temperature: torch.Tensor, hot: torch.Tensor, u: torch.Tensor,
                       block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """`engine.sampler.draw` without filters in two launches: logits [B, V] float32 (unit column stride),
    temperature [B] (> 0; greedy rows 1), hot [B] (> 0: sample, else argmax), u [B] uniforms in [0, 1).
    Returns (tokens int64 [B], logprobs float32 [B] under softmax(logits / T)). The cumulative sums run in
    another order than torch's cumsum, so a uniform within float rounding of a token boundary may pick the
    neighbour torch would not; everywhere else the token is torch's."""
    b, v = logits.shape
    if logits.stride(1) != 1 or not (temperature.shape == hot.shape == u.shape == (b,)):
        raise ValueError(f"inverse_cdf_sample: logits {tuple(logits.shape)} (stride {logits.stride()}) with "
                         f"temperature {tuple(temperature.shape)}, hot {tuple(hot.shape)}, u {tuple(u.shape)}")
    dev = logits.device
    tokens = torch.empty(b, dtype=torch.long, device=dev)
    logprobs = torch.empty(b, dtype=torch.float32, device=dev)
    if b == 0:
        return tokens, logprobs
    chunk, nchunk = split(v, b, block)  # the one walk per row covers a single chunk
    part = torch.empty(3, b * nchunk, dtype=torch.float32, device=dev)
    idx = torch.empty(b * nchunk, dtype=torch.int32, device=dev)
    _chunk_kernel[(b, nchunk)](logits, temperature, idx, part[0], part[1], part[2], idx, v, logits.stride(0),
                               CHUNK=chunk, BLOCK=block, NCHUNK=nchunk, RACE=False, num_warps=4)
    _cdf_pick_kernel[(b,)](logits, temperature, hot, u, part[0], part[1], part[2], idx, tokens, logprobs, v,
                           logits.stride(0), CHUNK=chunk, BLOCK=block, NCHUNK=nchunk,
                           BLOCK_C=max(16, triton.next_power_of_2(nchunk)), num_warps=4)
    return tokens, logprobs
