"""`npr-async make-data`: write the synthetic verifiable task as JSONL or Parquet rows {id, prompt, answer}.

Rows are written here directly (JSONL: one JSON object a line; Parquet: pyarrow), in the row shape that
`npr_async/data.py` reads.
"""
from __future__ import annotations

import json
from pathlib import Path


def configure(parser) -> None:
    from npr_async.task import LEVELS

    parser.add_argument("--n", type=int, required=True, help="number of problems")
    parser.add_argument("--difficulty", type=int, default=2, choices=sorted(LEVELS),
                        help="1..8: parts, operand range and operators grow with it (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same rows")
    parser.add_argument("--out", required=True, help="output file, .jsonl or .parquet")
    parser.add_argument("--with-traces", action="store_true",
                        help="add a `trace` column: a correct NPR-format solution (SFT data)")


def write_rows(rows: list[dict], path: str) -> Path:
    out = Path(path)
    if out.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"--out must end in .jsonl or .parquet, got {path!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = list(rows[0]) if rows else ["id", "prompt", "answer"]
        table = pa.table({k: pa.array([r[k] for r in rows], type=pa.string()) for k in keys})
        pq.write_table(table, str(out))
    return out


def run(args) -> int:
    from npr_async.task import make_dataset

    if args.n < 1:
        raise SystemExit(f"npr-async make-data: --n must be >= 1, got {args.n}")
    if Path(args.out).suffix not in (".jsonl", ".parquet"):
        raise SystemExit(f"npr-async make-data: --out must end in .jsonl or .parquet, got {args.out!r}")
    rows = make_dataset(args.n, args.difficulty, args.seed, with_traces=args.with_traces)
    out = write_rows(rows, args.out)
    print(f"wrote {len(rows)} problems (difficulty {args.difficulty}, seed {args.seed}) to {out}")
    return 0
