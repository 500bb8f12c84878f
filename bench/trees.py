"""Compare source trees of the engine in one device call: each tree's own `bench/engine.py`, run interleaved.

A kernel change measured stand-alone can move the engine's step the other way (session 9: BENCHMARKS.md), and
the clock and power of a GPU drift between calls, so changes are compared in the engine, in one call, A B A B.

    # here: copy revisions into the working tree (untracked, so they travel with it to the device)
    python3 bench/trees.py export main=HEAD qk=exp/qk-halves [--set qk:engine/triton_attention.py:OLD:NEW]
    # on the device: every tree's bench/engine.py with the same arguments, --rounds times, then a table
    python3 bench/trees.py run --trees _v/main,_v/qk --rounds 2 -- --batches 16,64 --forks '' --llm '' --hf 0 \
        --compile 0 --profile 1

Each tree's `bench/engine.py` puts its own directory first on sys.path, so it imports the `engine/` beside it.
Results go to $OUT/trees/<tree>-<round>/engine.json; the table gives the decode step (ms) per batch and, with
--profile 1, each kernel's GPU time per step (the kernels whose time differs most between trees first).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("engine", "bench")  # what bench/engine.py imports from a tree


def export(root: Path, name: str, rev: str, dest: Path, edits: list[tuple[str, str, str]] = ()) -> Path:
    """`git archive` of `rev`'s engine/ and bench/ into dest/name; each edit (file, old, new) must match once."""
    out = dest / name
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it first")
    blob = subprocess.run(["git", "archive", "--format=tar", rev, *PARTS], cwd=root, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(blob.stdout)) as tar:
        tar.extractall(out, filter="data")
    for file, old, new in edits:
        path = out / file
        text = path.read_text()
        if text.count(old) != 1:
            raise ValueError(f"{name}: {old!r} occurs {text.count(old)} times in {file}, not once")
        path.write_text(text.replace(old, new))
    return out


def table(results: dict[str, list[dict]]) -> str:
    """results: tree -> its rounds' engine.json documents. Step ms per batch, then kernel ms per step."""
    trees = list(results)
    lines = ["| batch | " + " | ".join(f"{t} step ms" for t in trees) + " |", "|---" * (len(trees) + 1) + "|"]
    batches = sorted({r["batch"] for docs in results.values() for d in docs for r in d.get("decode", [])})
    for b in batches:
        cells = []
        for t in trees:
            ms = [r["step_ms"] for d in results[t] for r in d.get("decode", []) if r["batch"] == b]
            cells.append(" / ".join(f"{x:.3f}" for x in ms) or "-")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    for key in sorted({k for docs in results.values() for d in docs for k in d if k.startswith("profile_b")},
                      key=lambda k: int(k[len("profile_b"):])):
        kernels: dict[str, dict[str, list[float]]] = {}
        for t in trees:
            for d in results[t]:
                for row in d.get(key, []):
                    kernels.setdefault(row["name"], {}).setdefault(t, []).append(row["ms_per_step"])
        mean = {k: {t: sum(v) / len(v) for t, v in per.items()} for k, per in kernels.items()}
        spread = {k: max(m.values()) - min(m.values()) if len(m) == len(trees) else float("inf")
                  for k, m in mean.items()}
        lines += ["", f"{key} (ms per step, mean over rounds)", "| kernel | " + " | ".join(trees) + " |",
                  "|---" * (len(trees) + 1) + "|"]
        for k in sorted(mean, key=lambda k: -spread[k])[:12]:
            lines.append(f"| {k[:60]} | " + " | ".join(f"{mean[k][t]:.3f}" if t in mean[k] else "-" for t in trees)
                         + " |")
    return "\n".join(lines)


def run(trees: list[str], rounds: int, args: list[str], out: Path) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {t: [] for t in trees}
    for r in range(rounds):
        for t in trees:  # interleaved: drift shows up as spread within a tree, not as a difference between trees
            name = Path(t).resolve().name if t != "." else "here"
            dest = out / f"{name}-{r}"
            cmd = [sys.executable, str(Path(t) / "bench" / "engine.py"), *args, "--out", str(dest)]
            print(f"== {t} round {r}: {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True)
            results[t].append(json.loads((dest / "engine.json").read_text()))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="NAME=REV ...: copy revisions' engine/ and bench/ into --dest/NAME")
    ex.add_argument("revs", nargs="+")
    ex.add_argument("--dest", default=str(ROOT / "_v"))
    ex.add_argument("--set", action="append", default=[], help="NAME:FILE:OLD:NEW, an exact one-place edit")
    rn = sub.add_parser("run", help="each tree's bench/engine.py with the arguments after --, interleaved")
    rn.add_argument("--trees", required=True, help="comma-separated tree roots ('.' is this checkout)")
    rn.add_argument("--rounds", type=int, default=2)
    rn.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "trees"))
    rn.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    if a.cmd == "export":
        edits: dict[str, list[tuple[str, str, str]]] = {}
        for s in a.set:
            name, file, old, new = s.split(":", 3)
            edits.setdefault(name, []).append((file, old, new))
        revs = dict(spec.partition("=")[::2] for spec in a.revs)
        if not all(revs.values()) or len(revs) < len(a.revs):
            raise SystemExit(f"export: give distinct NAME=REV pairs, got {a.revs}")
        if set(edits) - set(revs):
            raise SystemExit(f"export: --set for trees not exported: {sorted(set(edits) - set(revs))}")
        for name, rev in revs.items():
            print(export(ROOT, name, rev, Path(a.dest), edits.get(name, [])))
        return 0
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    results = run(a.trees.split(","), a.rounds, args, Path(a.out))
    text = table(results)
    print(text)
    Path(a.out, "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
