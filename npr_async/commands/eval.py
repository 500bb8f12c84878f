"""`npr-async eval`: avg@k, best@k, parallel trigger rate, branches per fork and tokens/s of a model.

    npr-async eval --model DIR --data FILE --k 8 [--out results.json] [--samples-out samples.jsonl]

The summary JSON goes to stdout (and `--out`); the table goes to stderr, rich on a terminal, plain otherwise,
so `npr-async eval ... | jq .avg_at_k` works. Sampling defaults are NPR's evaluation settings
(`rollout.eval_sampling`: temperature 1.0, top-p 0.7) with the engine's default budgets.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def configure(parser) -> None:
    from npr_async.config import EngineConfig, RolloutConfig

    e, s = EngineConfig(), RolloutConfig().eval_sampling
    parser.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--data", required=True, help="JSONL or Parquet rows {id, prompt, answer}")
    parser.add_argument("--k", type=int, default=8, help="samples per problem (default 8: avg@8)")
    parser.add_argument("--temperature", type=float, default=s.temperature, help=f"default {s.temperature}")
    parser.add_argument("--top-p", type=float, default=s.top_p, help=f"default {s.top_p}")
    parser.add_argument("--max-total-tokens", type=int, default=e.max_total_tokens,
                        help=f"budget of one answer, all branches counted (default {e.max_total_tokens})")
    parser.add_argument("--max-path-tokens", type=int, default=None,
                        help="critical-path budget (default: --max-total-tokens)")
    parser.add_argument("--sequential", action="store_true", help="decode without forks (a baseline)")
    parser.add_argument("--seed", type=int, default=None, help="same seed, same samples (default: random)")
    parser.add_argument("--verifier", default="math", help="verifier name or dotted path (rows may name their own)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    parser.add_argument("--batch-size", type=int, default=None, help="problems per engine call (default: all)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--out", default=None, help="write the summary JSON here too")
    parser.add_argument("--samples-out", default=None, help="write one JSONL row per answer here")


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"npr-async eval: {msg}")


def load_eval_rows(path: str, limit: int | None = None) -> list[dict]:
    """The dataset rows, or a SystemExit that names the file (and line, from load_rows)."""
    if not Path(path).is_file():
        raise _fail(f"--data {path!r}: no such file")
    from npr_async.data import load_rows

    try:
        rows = list(load_rows(path))
    except (ValueError, OSError) as e:  # DatasetError (a ValueError) already names file:line
        raise _fail(f"--data: {e}") from None
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise _fail(f"--data {path!r}: no rows")
    return rows


def check_model_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise _fail(f"--model {path!r}: no such directory")
    if not (p / "config.json").is_file():
        raise _fail(f"--model {path!r}: no config.json (expected an HF model directory)")
    return p


def run(args) -> int:
    for name in ("k", "max_total_tokens", "limit", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise _fail(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    model_dir = check_model_dir(args.model)
    rows = load_eval_rows(args.data, args.limit)

    import torch

    from engine.llm import LLM
    from engine.sampler import SamplingParams
    from npr_async.config import EngineConfig, SamplingConfig
    from npr_async.evaluation import evaluate, render_table

    try:
        sampling = SamplingParams.from_config(
            EngineConfig(), SamplingConfig(), temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            max_total_tokens=args.max_total_tokens,
            max_path_tokens=args.max_path_tokens or args.max_total_tokens, parallel=not args.sequential)
    except ValueError as e:
        raise _fail(str(e)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    llm = LLM(str(model_dir), device=device)

    def progress(done: int, total: int) -> None:
        print(f"eval: {done}/{total} problems", file=sys.stderr, flush=True)

    result = evaluate(llm, rows, k=args.k, sampling=sampling, verifier=args.verifier,
                      batch_size=args.batch_size, progress=progress if args.batch_size else None)
    summary = {"model": str(model_dir), "data": args.data, "device": device, **result.to_dict()}
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    if args.samples_out:
        Path(args.samples_out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.samples_out, "w", encoding="utf-8") as f:
            for s in result.samples:
                f.write(json.dumps(s.to_dict(), ensure_ascii=False) + "\n")
    render_table(result, file=sys.stderr)
    print(text)
    return 0
