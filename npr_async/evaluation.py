"""Held-out evaluation: k samples per problem through the engine, verified, summarised as NPR reports them.

`evaluate(llm, rows, k)` is what `npr-async eval` and the training loop (accuracy after SFT, after RL) call.
It is split in two so the arithmetic can be checked on its own:

- `evaluate` samples (timing only the engine's `generate` calls) and verifies each response;
- `summarize(samples, k, wall_seconds)` turns per-sample results into the metrics (NPR-FACTS.md, evaluation):
  avg@k (mean correctness over all samples), best@k (share of problems with at least one correct sample),
  parallel trigger rate (share of answers that forked at least once), mean branches per fork (all branches
  ÷ all forks), tokens/s (flattened generated tokens, every branch counted, ÷ generation wall clock).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class SampleResult:
    """One verified answer: the JSONL row of `--samples-out`."""
    prompt_id: str
    sample_idx: int
    correct: bool
    reward: float
    format_ok: bool  # NPR structure valid (format.validate: no errors)
    format_score: float  # NPR's format score, 0.0 perfect .. -2.0
    num_tokens: int  # generated tokens, all branches
    critical_path: int
    num_forks: int
    num_branches: int
    finish_reason: str
    seed: int | None = None
    extracted: Any = None  # the answer the verifier read, when it says
    text: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    k: int
    num_problems: int
    num_samples: int
    avg_at_k: float  # mean correctness over all samples (NPR's avg@k)
    best_at_k: float  # share of problems with at least one correct sample
    parallel_trigger_rate: float  # share of samples with num_forks > 0
    branches_per_fork: float  # total branches / total forks (0.0 when nothing forked)
    tokens_per_s: float  # flattened generated tokens / generation wall clock
    mean_tokens: float
    mean_critical_path: float
    mean_reward: float
    format_ok_rate: float
    mean_format_score: float
    total_tokens: int
    wall_seconds: float  # generation only (verification excluded)
    finish_reasons: dict[str, int] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)  # the parameters used (for the JSON report)
    samples: list[SampleResult] = field(default_factory=list, repr=False)

    def to_dict(self, with_samples: bool = False) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def summarize(samples: Sequence[SampleResult], k: int, wall_seconds: float,
              sampling: dict[str, Any] | None = None) -> EvalResult:
    """The metrics of verified samples (any order; grouped by `prompt_id` for best@k)."""
    by_problem: dict[str, list[bool]] = {}
    for s in samples:
        by_problem.setdefault(s.prompt_id, []).append(s.correct)
    forks = sum(s.num_forks for s in samples)
    total = sum(s.num_tokens for s in samples)
    return EvalResult(
        k=k, num_problems=len(by_problem), num_samples=len(samples),
        avg_at_k=_mean([float(s.correct) for s in samples]),
        best_at_k=_mean([float(any(c)) for c in by_problem.values()]),
        parallel_trigger_rate=_mean([float(s.num_forks > 0) for s in samples]),
        branches_per_fork=sum(s.num_branches for s in samples) / forks if forks else 0.0,
        tokens_per_s=total / wall_seconds if wall_seconds > 0 else 0.0,
        mean_tokens=_mean([s.num_tokens for s in samples]),
        mean_critical_path=_mean([s.critical_path for s in samples]),
        mean_reward=_mean([s.reward for s in samples]),
        format_ok_rate=_mean([float(s.format_ok) for s in samples]),
        mean_format_score=_mean([s.format_score for s in samples]),
        total_tokens=total, wall_seconds=wall_seconds,
        finish_reasons=dict(sorted(Counter(s.finish_reason for s in samples).items())),
        sampling=dict(sampling or {}), samples=list(samples))


def score_response(row: dict, traj, verifier: str = "math", verifier_config: Any = None,
                   max_plans: int = 5, max_depth: int = 5) -> SampleResult:
    """Verify one trajectory's text against its row; the same scoring whether the text came from the engine
    or was written by hand (tests). Reward = the answer reward; format_ok = the structural validator, as in
    Stage 3's `filter` rule (verifiers/format.py), so eval and training agree on what "format ok" means."""
    from npr_async.verifiers import get_verifier, task_verifier_name
    from npr_async.verifiers.format import combine

    # a row may name its own verifier (mixed math/code sets); `verifier` is the default for the rest
    v = get_verifier(task_verifier_name(row, default=verifier), verifier_config)
    verdict = combine(v.verify(row, traj.text), traj.text, "filter", max_plans=max_plans, max_depth=max_depth)
    d = verdict.details
    return SampleResult(
        prompt_id=str(traj.prompt_id), sample_idx=int(traj.sample_idx), correct=bool(verdict.correct),
        reward=float(verdict.reward), format_ok=bool(d["format_ok"]), format_score=float(d["format_score"]),
        num_tokens=int(traj.num_tokens), critical_path=int(traj.critical_path), num_forks=int(traj.num_forks),
        num_branches=int(traj.num_branches), finish_reason=str(traj.finish_reason), seed=traj.seed,
        extracted=d.get("extracted"), text=traj.text)


def default_sampling():
    """NPR's evaluation sampling (top-p 0.7, temperature 1.0) with the engine's default budgets."""
    from engine.sampler import SamplingParams
    from npr_async.config import EngineConfig, RolloutConfig

    return SamplingParams.from_config(EngineConfig(), RolloutConfig().eval_sampling)


def _prompt_of(row: dict, prompt_format: Callable[[str], str]) -> str | list[int]:
    # pre-tokenised rows are used as they are: their template was applied when they were made
    if row.get("prompt_ids") is not None:
        return [int(t) for t in row["prompt_ids"]]
    return prompt_format(row["prompt"])


def evaluate(llm, rows: Sequence[dict], k: int = 8, sampling=None, verifier: str = "math",
             prompt_format: Callable[[str], str] | None = None, verifier_config: Any = None,
             batch_size: int | None = None, progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Sample `k` answers per row with `llm` (an `engine.llm.LLM`), verify them, and summarise.

    rows: `{id, prompt, answer}` (or `tests`; `prompt_ids` to skip the chat template).
    sampling: a `SamplingParams` (default: `default_sampling()`). With `sampling.seed` set, sample j of row i
    gets the seed `branch_seed(seed, (i, j))`, so runs repeat and the k samples differ; with None the engine
    picks (and records) a seed per sample.
    prompt_format: question -> prompt text; default: the chat template of `llm.tokenizer` (`format_prompt`).
    batch_size: rows per `generate` call (default: all at once; the engine schedules within its KV pool).
    progress: called with (rows done, rows total) after each batch.
    """
    import msgspec

    from engine.sampler import branch_seed

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows = list(rows)
    if not rows:
        raise ValueError("no rows to evaluate")
    missing = [i for i, r in enumerate(rows) if "id" not in r or ("prompt" not in r and "prompt_ids" not in r)]
    if missing:
        raise ValueError(f"rows {missing[:5]} lack `id` or `prompt`")
    if len({str(r["id"]) for r in rows}) != len(rows):
        raise ValueError("row ids are not unique: best@k groups samples by id")
    sampling = sampling if sampling is not None else default_sampling()
    if prompt_format is None:
        tokenizer = getattr(llm, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("llm has no `tokenizer`: pass prompt_format or rows with `prompt_ids`")
        from npr_async.tokenizer import format_prompt

        prompt_format = lambda q: format_prompt(tokenizer, q)  # noqa: E731
    batch_size = batch_size or len(rows)
    max_depth = getattr(getattr(llm, "config", None), "max_depth", 5)  # the engine's nesting limit

    samples: list[SampleResult] = []
    wall = 0.0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompts, params, ids = [], [], []
        for i, row in enumerate(batch, start):
            prompt = _prompt_of(row, prompt_format)
            for j in range(k):
                prompts.append(prompt)
                ids.append(str(row["id"]))
                params.append(sampling if sampling.seed is None
                              else msgspec.structs.replace(sampling, seed=branch_seed(sampling.seed, (i, j))))
        t0 = time.perf_counter()
        trajs = llm.generate(prompts, params, prompt_ids=ids)
        wall += time.perf_counter() - t0
        if len(trajs) != len(prompts):
            raise RuntimeError(f"engine returned {len(trajs)} trajectories for {len(prompts)} prompts")
        for n, traj in enumerate(trajs):
            row = batch[n // k]
            traj.prompt_id, traj.sample_idx = str(row["id"]), n % k  # ours, whatever the engine numbered
            samples.append(score_response(row, traj, verifier, verifier_config,
                                          max_plans=sampling.max_plans, max_depth=max_depth))
        if progress is not None:
            progress(min(start + batch_size, len(rows)), len(rows))
    used = {f: getattr(sampling, f) for f in sampling.__struct_fields__}
    return summarize(samples, k, wall, sampling=used)


# -- reporting --------------------------------------------------------------------------------------------

ROWS = [  # (label, key, format)
    ("problems", "num_problems", "{}"), ("samples", "num_samples", "{}"), ("k", "k", "{}"),
    ("avg@k", "avg_at_k", "{:.2%}"), ("best@k", "best_at_k", "{:.2%}"),
    ("parallel trigger rate", "parallel_trigger_rate", "{:.2%}"),
    ("branches per fork", "branches_per_fork", "{:.2f}"), ("tokens/s", "tokens_per_s", "{:,.1f}"),
    ("mean tokens", "mean_tokens", "{:,.1f}"), ("mean critical path", "mean_critical_path", "{:,.1f}"),
    ("mean reward", "mean_reward", "{:+.3f}"), ("format ok", "format_ok_rate", "{:.2%}"),
    ("mean format score", "mean_format_score", "{:.3f}"), ("generation seconds", "wall_seconds", "{:.2f}"),
]


def table_rows(result: EvalResult) -> list[tuple[str, str]]:
    d = result.to_dict()
    out = [(label, fmt.format(d[key])) for label, key, fmt in ROWS]
    out.append(("finish reasons", ", ".join(f"{r}: {n}" for r, n in result.finish_reasons.items()) or "-"))
    return out


def render_table(result: EvalResult, file=None, rich: bool | None = None) -> None:
    """The summary as a rich table on a terminal, plain aligned text otherwise."""
    import sys

    file = file if file is not None else sys.stderr
    rich = file.isatty() if rich is None else rich
    rows = table_rows(result)
    if rich:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="npr-async eval")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for label, value in rows:
            t.add_row(label, value)
        Console(file=file).print(t)
        return
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}", file=file)
