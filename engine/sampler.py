"""Sampling: per-request parameters and one batched step that draws one token per row.

Randomness is counter-based: a sampling row draws the single uniform `uniforms(seed, position)`, output number
position + 1 of SplitMix64 seeded with `branch_seed(request seed, branch key)`, hashed on the host with numpy
(no generator state, no kernel launch). A row's token therefore depends only on its own logits, parameters,
seed, branch and position: never on the batch around it, the order of the rows, or preemption (a recomputed
request draws the same numbers at the same positions). Sampling is by inverse CDF (the first token whose
cumulative probability exceeds u times the total). The returned logprob is under the distribution actually
sampled from (after penalty, temperature, top-k and top-p renormalisation): the logprob the learner's ratio
uses. Greedy rows (temperature 0) take the argmax of the penalised logits, with the logprob of that row's
unfiltered T=1 law.

`sample` is the plain function; `BatchSampler` is the engine's: per-row parameters cached per branch and sent
in one host-to-device copy a step, each branch's own tokens (its repetition penalty's list) kept on the device
and extended there by the sampled tokens, filters skipped when no row asks for them (a host decision), and no
synchronisation but the final read of tokens and logprobs.
"""
from __future__ import annotations

import hashlib
import time
from typing import Sequence

import msgspec
import numpy as np
import torch

from engine.host_copies import Readback, upload
from npr_async.config import EngineConfig, SamplingConfig

_E, _S = EngineConfig(), SamplingConfig()


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True):
    temperature: float = _S.temperature  # 0: greedy
    top_p: float = _S.top_p  # nucleus: keep the smallest prefix whose mass reaches top_p
    top_k: int = _S.top_k  # 0: off
    repetition_penalty: float = _S.repetition_penalty  # outside branches (HF semantics)
    branch_repetition_penalty: float = _E.branch_repetition_penalty  # inside a step, over its own tokens
    seed: int | None = None  # None: the engine picks one (and records it)
    max_total_tokens: int = _E.max_total_tokens  # all branches counted
    max_path_tokens: int = _E.max_path_tokens  # critical path
    max_step_tokens: int = _E.max_step_tokens  # force-closes a step
    max_plans: int = _E.max_plans
    parallel: bool = _E.parallel  # False: sequential decoding, no forks (Stage 1)

    def __post_init__(self):
        def bad(name, rule):
            raise ValueError(f"SamplingParams.{name} must be {rule}, got {getattr(self, name)!r}")

        if not (self.temperature >= 0 and self.temperature != float("inf")):
            bad("temperature", ">= 0 and finite (0 = greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if self.top_k < 0:
            bad("top_k", ">= 0 (0 = off)")
        for name in ("repetition_penalty", "branch_repetition_penalty"):
            if not 0 < getattr(self, name) < float("inf"):
                bad(name, "> 0 and finite (1 = off)")
        for name in ("max_total_tokens", "max_path_tokens", "max_step_tokens", "max_plans"):
            if getattr(self, name) < 1:
                bad(name, ">= 1")

    @classmethod
    def from_config(cls, engine: EngineConfig, sampling: SamplingConfig, **overrides) -> "SamplingParams":
        """Parameters of a run: engine budgets + rollout (or eval) sampling, then explicit overrides."""
        fields = dict(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            repetition_penalty=sampling.repetition_penalty,
            branch_repetition_penalty=engine.branch_repetition_penalty, max_total_tokens=engine.max_total_tokens,
            max_path_tokens=engine.max_path_tokens, max_step_tokens=engine.max_step_tokens,
            max_plans=engine.max_plans, parallel=engine.parallel)
        return cls(**{**fields, **overrides})


def branch_seed(seed: int, branch: int | Sequence[int] = ()) -> int:
    """A 63-bit seed for (request seed, branch key), stable across processes (no Python hash())."""
    key = (int(seed),) + ((int(branch),) if isinstance(branch, int) else tuple(int(b) for b in branch))
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def uniforms(seeds, counters) -> np.ndarray:
    """float32 in [0, 1), one per (seed, counter): output number counter + 1 of SplitMix64 seeded with `seed`.
    23 random bits, so that u * total < total exactly in float32: inverse-CDF sampling never runs off the end
    of the cumulative sums, nor lands on a token of probability 0."""
    z = np.asarray(seeds, dtype=np.uint64) + (np.asarray(counters, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(41)).astype(np.float32) * np.float32(2.0 ** -23)


def penalize(x: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    """HF repetition penalty in place on float logits x [B, V]: row b divides the positive logits (multiplies the
    negative ones) of tokens[b, :counts[b]] by penalties[b]. tokens [B, W] (columns from counts[b] on are
    ignored, a row of count 0 is left alone), counts [B], penalties [B], on x's device. Repeated tokens and the
    padding (it repeats the row's first token) write the same value, so the scatter is exact."""
    col = torch.arange(tokens.shape[1], device=x.device)
    tok = torch.where(col < counts[:, None], tokens, tokens[:, :1]).long()
    pen = torch.where(counts > 0, penalties, 1.0)[:, None]
    v = x.gather(1, tok)
    return x.scatter_(1, tok, torch.where(v < 0, v * pen, v / pen))


def apply_repetition_penalty(logits: torch.Tensor, token_lists: Sequence, penalties: Sequence[float]) -> torch.Tensor:
    """`penalize` from per-row token lists (None or empty: no penalty), in place on float logits [B, V]."""
    counts = np.array([len(t) if t is not None else 0 for t in token_lists], dtype=np.int64)
    pad = np.zeros((len(counts), max(int(counts.max(initial=0)), 1)), dtype=np.int64)
    for b, t in enumerate(token_lists):
        pad[b, :counts[b]] = t if counts[b] else []
    dev = logits.device
    return penalize(logits, torch.from_numpy(pad).to(dev), torch.from_numpy(counts).to(dev),
                    torch.tensor(list(penalties), dtype=logits.dtype, device=dev))


def filtered_logprobs(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, do_k: bool = True,
                      do_p: bool = True) -> torch.Tensor:
    """log_softmax of x [B, V] after top-k (top_k [B], 0 = off; ties at the k-th value are kept) and top-p
    (top_p [B], 1 = off; keep the tokens whose preceding mass, in descending order, is < top_p). do_k / do_p
    False: no row filters that way (decided on the host: with neither, no sort at all)."""
    if do_k or do_p:
        srt, idx = x.sort(dim=-1, descending=True)
        drop = torch.zeros_like(srt, dtype=torch.bool)
        if do_k:
            k = top_k.clamp(1, x.shape[-1]).long()
            drop |= (top_k > 0)[:, None] & (srt < srt.gather(1, (k - 1)[:, None]))
        if do_p:
            probs = srt.masked_fill(drop, float("-inf")).softmax(-1)
            before = probs.cumsum(-1) - probs  # mass strictly before each token; the first crossing p stays
            drop |= (top_p < 1)[:, None] & (before >= top_p[:, None])  # 1 is off (before may round to 1)
        x = x.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return x.log_softmax(-1)


def sampling_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """log-probs [B, V] of the distribution each row samples from (-inf outside top-k / top-p).

    temperature [B] (0 = greedy: the unfiltered log-softmax at T=1), top_k [B] (0 = off, ties at the k-th
    value are kept), top_p [B] (keep tokens whose preceding mass, in descending order, is < top_p).
    """
    hot = temperature > 0
    x = logits / torch.where(hot, temperature, torch.ones_like(temperature))[:, None]
    return filtered_logprobs(x, torch.where(hot, top_k, 0), torch.where(hot, top_p, 1.0))


FUSED = True  # False: the torch passes on the GPU too (a benchmark's baseline)


def row_params(p: SamplingParams, penalty: float) -> tuple:
    """One row's parameters as `draw` reads them: (temperature, top_p, top_k, penalty, hot), greedy rows
    with temperature 1 and no filters (their law is the unfiltered T=1 one)."""
    hot = p.temperature > 0
    return (p.temperature, p.top_p, p.top_k, penalty, 1.0) if hot else (1.0, 1.0, 0, penalty, 0.0)


def draw(x: torch.Tensor, f: torch.Tensor, f_host: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int64 [B], logprobs float32 [B]) from penalised float logits x [B, V]. f float32 [6, B] on x's
    device, f_host the same on the host: rows of `row_params` (temperature, top_p, top_k, penalty, hot), then
    the uniforms. Work no row needs (temperature, filters, sampling, argmax) is skipped on the host's word.
    On a GPU, rows without top-k / top-p filters take two fused kernels (engine/triton_sampling.py) instead of
    the [B, V] log-softmax, exp and cumsum passes."""
    do_k, do_p = bool((f_host[2] > 0).any()), bool((f_host[1] < 1).any())
    if FUSED and x.is_cuda and x.stride(1) == 1 and not (do_k or do_p):
        from engine.triton_sampling import inverse_cdf_sample

        return inverse_cdf_sample(x, f[0], f[4], f[5])
    if (f_host[0] != 1).any():
        x = x / f[0][:, None]
    logp = filtered_logprobs(x, f[2], f[1], do_k, do_p)
    hot = f_host[4] > 0
    if hot.any():
        cdf = logp.exp().cumsum(-1)
        tokens = torch.searchsorted(cdf, f[5][:, None] * cdf[:, -1:], right=True)[:, 0]
        if not hot.all():
            tokens = torch.where(f[4] > 0, tokens, logp.argmax(-1))
    else:
        tokens = logp.argmax(-1)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], keys: Sequence[tuple[int, int] | None] | None = None,
           penalty_tokens: Sequence | None = None, penalties: Sequence[float] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of logits [B, V] -> (tokens int64 [B], logprobs float32 [B]).

    keys[b] = (seed, counter): row b's uniform is `uniforms(seed, counter)` (the engine: the branch's seed and
    the position of the token drawn); greedy rows (temperature 0) need none. penalty_tokens[b]: the tokens row
    b's repetition penalty covers; penalties[b]: its penalty (default params[b].repetition_penalty).
    """
    b = logits.shape[0]
    keys = [None] * b if keys is None else list(keys)
    if not (len(params) == len(keys) == b):
        raise ValueError(f"{b} rows but {len(params)} params and {len(keys)} keys")
    for i, (p, k) in enumerate(zip(params, keys)):
        if p.temperature > 0 and k is None:
            raise ValueError(f"row {i} samples (temperature {p.temperature}) but has no key (seed, counter)")
    x = logits.float().clone()
    pens = [p.repetition_penalty for p in params] if penalties is None else list(penalties)
    if penalty_tokens is not None:
        apply_repetition_penalty(x, penalty_tokens, pens)
    f = np.zeros((6, b), dtype=np.float32)
    f[:5] = np.array([row_params(p, pen) for p, pen in zip(params, pens)], dtype=np.float32).T
    live = [i for i, k in enumerate(keys) if k is not None]
    if live:
        f[5, live] = uniforms([keys[i][0] for i in live], [keys[i][1] for i in live])
    return draw(x, torch.from_numpy(f).to(x.device), f)


class BatchSampler:
    """The engine's sampler: one row per branch that reached the end of its segment (`Item.sample`).

    A branch's state, made at its first sample (`Branch.draw`): its stream's seed, its `row_params` and, when
    its penalty is on, a row of `seen`, the device table of its own sampled tokens (row 0: a dummy for rows
    without a penalty). A step sends the rows' parameters, uniforms, table rows and token counts in two
    host-to-device copies, appends the sampled tokens to the table on the device and syncs once, reading
    tokens and logprobs back together (into pinned memory behind an event: `engine/host_copies.py`).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Drop every branch's table row (each generate call starts afresh) and the call's wait."""
        self.seen = torch.zeros(64, 256, dtype=torch.int32, device=self.device)
        self.free = list(range(63, 0, -1))
        self.wait_s = 0.0  # host time blocked in `collect`: on a GPU, waiting for the device to finish the step

    def _grow(self, rows: int, cols: int) -> None:
        r, c = self.seen.shape
        nr, nc = max(r, rows if rows <= r else 2 * rows), max(c, cols if cols <= c else 2 * cols)
        if (nr, nc) != (r, c):
            new = torch.zeros(nr, nc, dtype=torch.int32, device=self.device)
            new[:r, :c] = self.seen
            self.seen, self.free = new, list(range(nr - 1, r - 1, -1)) + self.free

    def _attach(self, req, b) -> tuple:
        p = req.params
        pen = p.branch_repetition_penalty if b.fork is not None else p.repetition_penalty
        row = 0
        if pen != 1.0:
            if not self.free:
                self._grow(self.seen.shape[0] + 1, 0)
            row = self.free.pop()
            if b.own:  # e.g. a branch whose row was released: its tokens so far
                self._grow(0, len(b.own) + 1)
                self.seen[row, :len(b.own)] = upload(np.array(b.own, dtype=np.int32), self.device)
        b.draw = (branch_seed(req.seed, b.path), row_params(p, pen), row)
        return b.draw

    def release(self, branches) -> None:
        """Give back the table rows of branches that will not sample again (closed steps, finished requests)."""
        for b in branches:
            if b.draw is not None:
                if b.draw[2]:
                    self.free.append(b.draw[2])
                b.draw = None

    def __call__(self, logits: torch.Tensor, todo) -> tuple[list[int], list[float]]:
        """Sample row i of float logits [len(todo), V] (changed in place) for todo[i].sample of todo[i].req."""
        return self.collect(self.launch(logits, todo)[1])

    def collect(self, out: Readback) -> tuple[list[int], list[float]]:
        """Tokens and logprobs of a `launch`, read to the host (the step's one sync)."""
        t = time.perf_counter()
        tokens, logprobs = out.tolist()  # a Readback: waits for this step's copy, not for a step launched after it
        self.wait_s += time.perf_counter() - t
        return list(map(int, tokens)), logprobs

    def launch(self, logits: torch.Tensor, todo, ahead: int = 0) -> tuple[torch.Tensor, Readback]:
        """`__call__` without reading back: (tokens int64 [n] on the device, the [2, n] float64 pair of tokens
        and logprobs on its way to the host, which `collect` reads). ahead=1: each branch draws the token after
        the one it is drawing now, not yet on the host (its position + 1; its own tokens on the device already
        hold the current one)."""
        n = len(todo)
        prs, ks = [], []  # flat, n rows each: numpy converts one flat list faster than a list of tuples
        for it in todo:
            b = it.sample
            seed, pr, row = b.draw or self._attach(it.req, b)
            prs += pr
            ks += (seed, b.next_pos + ahead, row, len(b.own) + ahead if row else 0)
        ints = np.array(ks, dtype=np.int64).reshape(n, 4).T  # stream seed, position, table row, own tokens so far
        f = np.empty((6, n), dtype=np.float32)
        f[:5] = np.array(prs, dtype=np.float32).reshape(n, 5).T
        f[5] = uniforms(ints[0], ints[1])
        dev = self.device
        fd = upload(f, dev)
        table = ints[2:] if ints[2].any() else None
        if table is not None:
            width = int(table[1].max())
            self._grow(0, width + 1)
            td = upload(table, dev)
            if width:
                penalize(logits, self.seen[:, :width].index_select(0, td[0]), td[1], fd[3])
        tokens, logprobs = draw(logits, fd, f)
        if table is not None:  # own tokens, on the device (rows without a penalty all write the dummy row)
            self.seen[td[0], td[1]] = tokens.int()
        return tokens, Readback(torch.stack((tokens.double(), logprobs.double())))
