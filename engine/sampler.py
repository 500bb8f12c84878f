"""Sampling: per-request parameters, per-branch seeded generators, and one batched `sample` step.

A row's draw depends only on its own logits, parameters and generator: each row takes one uniform from
its own `torch.Generator` (seeded from (request seed, branch key)), so the batch around a request never
changes what it samples. The returned logprob is under the distribution actually sampled from (after
penalty, temperature, top-k and top-p renormalisation); that is the logprob the learner's ratio uses.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import msgspec
import torch

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


def make_generator(seed: int, branch: int | Sequence[int] = (), device: str | torch.device = "cpu") -> torch.Generator:
    """The generator of one branch of one request; the trunk uses branch key ()."""
    g = torch.Generator(device=device)
    g.manual_seed(branch_seed(seed, branch))
    return g


def apply_repetition_penalty(logits: torch.Tensor, token_lists: Sequence, penalties: Sequence[float]) -> torch.Tensor:
    """HF semantics, in place on float logits [B, V]: for each token already seen by row b, divide a positive
    logit by penalties[b] and multiply a negative one."""
    rows, toks = [], []
    for b, (tokens, pen) in enumerate(zip(token_lists, penalties)):
        if pen != 1.0 and tokens is not None and len(tokens):
            t = torch.as_tensor(tokens, dtype=torch.long, device=logits.device).unique()
            rows.append(torch.full_like(t, b))
            toks.append(t)
    if rows:
        r, t = torch.cat(rows), torch.cat(toks)
        pen = torch.tensor(list(penalties), dtype=logits.dtype, device=logits.device)[r]
        v = logits[r, t]
        logits[r, t] = torch.where(v < 0, v * pen, v / pen)
    return logits


def sampling_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """log-probs [B, V] of the distribution each row samples from (-inf outside top-k / top-p).

    temperature [B] (0 = greedy: the unfiltered log-softmax at T=1), top_k [B] (0 = off, ties at the k-th
    value are kept), top_p [B] (keep tokens whose preceding mass, in descending order, is < top_p).
    """
    greedy = temperature == 0
    x = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    filt_k = (top_k > 0) & ~greedy
    filt_p = (top_p < 1) & ~greedy
    if bool(filt_k.any()) or bool(filt_p.any()):
        srt, idx = x.sort(dim=-1, descending=True)
        drop = torch.zeros_like(srt, dtype=torch.bool)
        if bool(filt_k.any()):
            k = top_k.clamp(1, x.shape[-1]).to(torch.long)
            kth = srt.gather(1, (k - 1)[:, None])
            drop |= filt_k[:, None] & (srt < kth)
        if bool(filt_p.any()):
            probs = srt.masked_fill(drop, float("-inf")).softmax(-1)
            before = probs.cumsum(-1) - probs  # mass strictly before each token; the first crossing p stays
            drop |= filt_p[:, None] & (before >= top_p[:, None])
        x = x.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return x.log_softmax(-1)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
           penalty_tokens: Sequence | None = None, penalties: Sequence[float] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of logits [B, V] -> (tokens int64 [B], logprobs float32 [B]).

    penalty_tokens[b]: the tokens row b's repetition penalty covers (the engine passes a branch's own
    tokens inside a step); penalties[b]: its penalty (default params[b].repetition_penalty; the engine
    passes branch_repetition_penalty inside a step). Greedy rows (temperature 0) take the argmax of the
    penalised logits and need no generator; sampling rows need one each.
    """
    b = logits.shape[0]
    if not (len(params) == len(generators) == b):
        raise ValueError(f"{b} rows but {len(params)} params and {len(generators)} generators")
    x = logits.float().clone()
    if penalty_tokens is not None:
        pens = [p.repetition_penalty for p in params] if penalties is None else list(penalties)
        apply_repetition_penalty(x, penalty_tokens, pens)
    dev = x.device
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    logp = sampling_logprobs(x, temp, torch.tensor([p.top_k for p in params], device=dev),
                             torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev))
    tokens = logp.argmax(-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        for i in rows:
            if generators[i] is None:
                raise ValueError(f"row {i} samples (temperature {params[i].temperature}) but has no generator")
        # One uniform per row from the row's own generator: batch-independent draws.
        u = torch.stack([torch.rand((), generator=generators[i], device=generators[i].device) for i in rows]).to(dev)
        r = torch.tensor(rows, device=dev)
        cdf = logp[r].exp().cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        # Never land on a filtered token (float edge at the top of the cdf): step back to the last kept one.
        last_kept = logp.shape[-1] - 1 - torch.isfinite(logp[r]).flip(-1).to(torch.int8).argmax(-1)
        tokens[r] = torch.minimum(pick, last_kept)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]
