"""`npr-async train [CONFIG] [--set key=value ...] [--run-dir DIR] [--resume]`."""
from __future__ import annotations

import sys


def configure(p) -> None:
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded CPU default configs/tiny_cpu.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set controller.steps=20 (repeatable)")
    p.add_argument("--run-dir", help="where the run writes (default: logging.run_dir)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--fresh", action="store_true", help="delete an earlier run in the run directory first")


def run(args) -> int:
    import shutil
    from pathlib import Path

    from npr_async.config import load_config
    from npr_async.pipeline import train

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or cfg.logging.run_dir)
    if args.fresh and run_dir.exists() and not args.resume:
        shutil.rmtree(run_dir)
    try:
        summary = train(cfg, str(run_dir), resume=args.resume)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"npr-async train: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    table = Table(title="npr-async train: summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("stage", "heldout_accuracy_sft", "heldout_accuracy_final", "steps", "wall_seconds"):
        table.add_row(key, fmt(summary.get(key)))
    for when in ("sft", "final"):
        ev = summary.get(f"heldout_{when}") or {}
        for key in ("best_at_k", "parallel_trigger_rate", "branches_per_fork", "format_ok_rate", "tokens_per_s"):
            if key in ev:
                table.add_row(f"{when}: {key}", fmt(ev[key]))
    table.add_row("run_dir", summary.get("run_dir", ""))
    Console(stderr=False).print(table)
