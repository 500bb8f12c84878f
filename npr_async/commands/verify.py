"""`npr-async verify --data IN.jsonl --out OUT.jsonl`: score responses with the verifiers.

Rows are dataset rows (`id`, `prompt`, `answer` or `tests`, optional `verifier`) plus `response`; the output
adds `reward`, `correct` and `details`. Users check their data and their verifiers with it: the same process
pool (timeouts, sandbox, format rule of `verifier.format_reward`) as in training, without Ray unless `--ray`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSONL/Parquet rows with a `response` each")
    p.add_argument("--out", required=True, help="output .jsonl/.parquet: the rows plus reward, correct, details")
    p.add_argument("--config", default=None, help="YAML config (default: the embedded one); its `verifier` section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set verifier.format_reward=stage1")
    p.add_argument("--processes", type=int, default=0, help="verifier processes (default: the CPU count)")
    p.add_argument("--ray", action="store_true", help="use the Ray actor pool (verifier.num_workers actors)")


def check_responses(rows: list[dict], path: str) -> list[str]:
    """The rows' responses; a row without a string `response` raises ValueError naming its line."""
    if path.endswith(".jsonl"):  # load_rows skips blank lines: the i-th row is the i-th non-empty line
        with open(path, encoding="utf-8") as f:
            where = [f"{path}:{n}" for n, line in enumerate(f, 1) if line.strip()]
    else:
        where = [f"{path}: row {k}" for k in range(1, len(rows) + 1)]
    for row, w in zip(rows, where):
        if not isinstance(row.get("response"), str):
            got = "missing" if row.get("response") is None else type(row["response"]).__name__
            raise ValueError(f"{w}: row {row['id']!r} needs a string `response` ({got})")
    return [row["response"] for row in rows]


def run(args) -> int:
    import msgspec

    from npr_async.config import load_config
    from npr_async.data import DatasetError, load_rows, write_rows

    cfg = load_config(args.config, args.overrides).verifier
    try:
        rows = load_rows(args.data)
        responses = check_responses(rows, str(args.data))
    except (DatasetError, ValueError) as e:
        print(f"npr-async verify: {e}", file=sys.stderr)
        return 2
    tasks = [{k: v for k, v in r.items() if k != "response"} for r in rows]
    t = time.monotonic()
    if args.ray:
        import ray

        from actors.verifier_pool import VerifierPool

        ray.init(address=None, include_dashboard=False, log_to_driver=False)
        pool = VerifierPool(cfg)
        try:
            verdicts = pool.verify_batch(tasks, responses)
        finally:
            pool.shutdown()
            ray.shutdown()
    else:
        from npr_async.verifiers.procpool import VerifierProcessPool

        with VerifierProcessPool(cfg, processes=args.processes or os.cpu_count() or 1) as pool:
            verdicts = pool.verify_batch(tasks, responses)
    seconds = time.monotonic() - t
    out = [{**row, "reward": v.reward, "correct": v.correct, "details": msgspec.to_builtins(v.details)}
           for row, v in zip(rows, verdicts)]
    try:
        write_rows(args.out, out)
    except DatasetError as e:
        print(f"npr-async verify: {e}", file=sys.stderr)
        return 2
    n = len(out)
    errors = sum(1 for v in verdicts if "error" in v.details)
    malformed = sum(1 for v in verdicts if v.details.get("format_ok") is False)
    print(f"{n} rows: {sum(v.correct for v in verdicts)} correct ({100 * sum(v.correct for v in verdicts) / n:.1f}%), "
          f"mean reward {sum(v.reward for v in verdicts) / n:+.3f}, {errors} errors, {malformed} malformed "
          f"(format_reward={cfg.format_reward}); {n / max(seconds, 1e-9):.1f} verdicts/s -> {args.out}")
    return 0
