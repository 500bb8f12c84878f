"""`npr-async bench engine|transport|learner|e2e|rollout [ARGS...]`: run `bench/<name>.py` with ARGS.

The bench scripts live beside the packages (they are run on GPU machines from a checkout, not installed), so
they are loaded by path. A script's `main(argv)` is called when it has one; otherwise it runs as `__main__`.
"""
from __future__ import annotations

import argparse
import importlib.util
import runpy
import sys
from pathlib import Path

BENCHES = ("engine", "transport", "learner", "e2e", "rollout")
BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=BENCHES, help="which benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")


def run(args) -> int:
    path = BENCH_DIR / f"{args.which}.py"
    if not path.exists():
        print(f"npr-async bench: {path} does not exist (run from a source checkout)", file=sys.stderr)
        return 2
    root = str(path.parent.parent)
    if root not in sys.path:  # the scripts import `engine`, `npr_async` and their siblings in bench/
        sys.path.insert(0, root)
    argv = list(args.args)
    if "\ndef main(" in path.read_text():  # checked in the text so the script is imported at most once
        spec = importlib.util.spec_from_file_location(f"bench_{args.which}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return int(module.main(argv) or 0)
    old = sys.argv
    sys.argv = [str(path), *argv]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = old
    return 0
