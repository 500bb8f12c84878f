"""`npr-async verify` end to end in a real subprocess: math, code and format rows; bad rows name their line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from npr_async.verifiers.sandbox import bwrap_works, sandbox_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPR = ("<guideline>\n<plan>1: add the numbers</plan>\n</guideline>\n<step>\n1: 2 + 2 = 4 exactly\n</step>\n"
       "<takeaway>\nthe sum is four\n</takeaway>\n\\boxed{4}")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "npr_async", "verify", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_verify_rows(tmp_path):
    rows = [{"id": "1", "prompt": "2+2?", "answer": "4", "response": NPR},
            {"id": "2", "prompt": "2+2?", "answer": "5", "response": NPR},
            {"id": "3", "prompt": "2+2?", "answer": "4", "response": "plain \\boxed{4}"},
            {"id": "4", "prompt": "fmt", "answer": "-", "verifier": "format", "response": NPR}]
    if bwrap_works(sandbox_python()) is None:
        rows.append({"id": "5", "prompt": "add", "tests": [{"input": "1 2\n", "output": "3\n"}],
                     "response": "```python\nprint(sum(map(int, input().split())))\n```"})
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, rows)
    r = _cli("--data", str(src), "--out", str(out), "--processes", "1", "--set", "verifier.format_reward=stage1")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [row["id"] for row in rows]
    assert [g["correct"] for g in got] == [True, False, True, True, True][:len(rows)]
    assert got[0]["reward"] == 1.0 and got[1]["reward"] == -1.0
    assert got[2]["reward"] == -1.5 and got[2]["details"]["format_ok"] is False  # stage1: penalty replaces +1
    assert got[0]["response"] == NPR and "details" in got[0]
    assert "verdicts/s" in r.stdout


@pytest.mark.parametrize("bad,match", [
    ('{"id": "2", "prompt": "p", "answer": "4"}', "in.jsonl:3: row '2' needs a string `response`"),
    ('{"id": "2", "prompt": "p"}', "in.jsonl:3: row '2' has neither 'answer' nor 'tests'"),
    ('{"id": "2", "prompt": "p", "answer": "4", "response": ', "in.jsonl:3: not valid JSON"),
])
def test_bad_rows_name_the_line(tmp_path, bad, match):
    src = tmp_path / "in.jsonl"
    _write(src, [{"id": "1", "prompt": "p", "answer": "4", "response": "x"}, "", bad])
    r = _cli("--data", str(src), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and match in r.stderr, r.stderr
    assert not (tmp_path / "o.jsonl").exists()
