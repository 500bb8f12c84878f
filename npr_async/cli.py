"""`npr-async` / `python3 -m npr_async`: one subcommand per module, imported only when it runs.

Each command module defines `configure(parser)` (its arguments) and `run(args) -> int | None`.
Imports are lazy so `npr-async --help` does not pay for torch and Ray.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("npr_async.commands.train", "train with a config (no argument: the embedded CPU default)"),
    "init-model": ("npr_async.commands.init_model", "write a random-init Qwen3 model and tokenizer in HF format"),
    "generate": ("npr_async.commands.generate", "parallel-decode prompts with the NPR-Engine to JSONL trajectories"),
    "score": ("npr_async.commands.score", "add the learner's logprobs to trajectories written by `generate`"),
    "sft": ("npr_async.commands.sft", "Stage 2: rejection sampling and parallel SFT"),
    "verify": ("npr_async.commands.verify", "score responses with the verifiers"),
    "eval": ("npr_async.commands.eval", "avg@k, best@k, parallel trigger rate and tokens/s of a model"),
    "make-data": ("npr_async.commands.make_data", "write the synthetic verifiable task as JSONL or Parquet"),
    "bench": ("npr_async.commands.bench", "benchmarks (engine, transport, learner, e2e)"),
    "plan": ("npr_async.commands.plan", "recommend actor counts for a cluster from measured rates"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npr-async", description="RL for native parallel reasoners.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = next((a for a in argv if not a.startswith("-")), None)
    if name not in COMMANDS:
        name = None
    args = build_parser(only=name).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    from npr_async.config import ConfigError

    try:
        code = module.run(args)
    except ConfigError as e:
        print(f"npr-async {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"npr-async {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
