"""`npr-async score`: add the learner's logprobs to trajectories written by `npr-async generate`.

Each output row is the input row plus `learner_logprobs` (float per token: the learner's logprob of every
generated token, sampled or forced, scored at its predecessor in the token tree; null for the prompt) and
`logprob_max_abs_diff` (max |learner − engine| over the sampled tokens), to inspect train/inference mismatch.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from npr_async.config import ConfigError


def configure(p) -> None:
    p.add_argument("--model", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--trajectories", required=True, help="input JSONL written by `npr-async generate`")
    p.add_argument("--out", required=True, help="output JSONL (input rows + learner_logprobs)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per packed forward")


def read_rows(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"trajectories file not found: {path}")
    from npr_async.data import DatasetError, read_jsonl

    try:
        return read_jsonl(p)
    except DatasetError as e:
        raise ConfigError(str(e)) from None


def score_rows(model, rows: list[dict], max_tokens: int = 8192, device=None) -> list[dict]:
    from npr_async.messages import Trajectory
    from npr_async.training.packing import Sample
    from npr_async.training.trainer import score_samples

    samples = []
    for n, row in enumerate(rows, 1):
        try:
            t = Trajectory.from_json_row(row)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"trajectory row {n}: {e}") from None
        s = Sample.from_trajectory(t)
        s.loss_mask = np.arange(len(t)) >= max(t.prompt_len, 1)  # every generated token, forced ones too
        samples.append(s)
    out = []
    for row, s, lp in zip(rows, samples, score_samples(model, samples, max_tokens, device)):
        engine = np.array([np.nan if x is None else x for x in row["logprobs"]], dtype=np.float64)
        sampled = np.asarray(row["sampled"], dtype=bool) & s.loss_mask
        diff = np.abs(lp[sampled] - engine[sampled])
        out.append({**row, "learner_logprobs": [None if math.isnan(x) else float(x) for x in lp.tolist()],
                    "logprob_max_abs_diff": float(diff.max()) if diff.size else None})
    return out


def run(args) -> int:
    import torch

    from engine.loader import load_model

    rows = read_rows(args.trajectories)
    model = load_model(args.model, getattr(torch, args.dtype), args.device).eval()
    scored = score_rows(model, rows, args.max_tokens, args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from npr_async.data import write_jsonl

    write_jsonl(args.out, scored)
    diffs = [r["logprob_max_abs_diff"] for r in scored if r["logprob_max_abs_diff"] is not None]
    print(f"scored {len(scored)} trajectories -> {args.out}; max |learner - engine| over sampled tokens: "
          f"{max(diffs) if diffs else float('nan'):.3g}")
    return 0
