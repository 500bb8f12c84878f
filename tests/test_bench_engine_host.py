"""bench/engine_host.py on the CPU, as a process (it wraps the engine's classes to time its phases): every
request runs its whole token budget, and the report splits each step into the phases it names."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_engine_host_runs_the_workload_and_reports_its_phases(tmp_path):
    r, k, n, take = 2, 3, 8, 4
    cmd = [sys.executable, str(ROOT / "bench" / "engine_host.py"), "--cases", f"{r}x{k}", "--vocab", "448",
           "--prompt", "24", "--branch-len", str(n), "--takeaway", str(take), "--profile", "0", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    (res,) = json.loads((tmp_path / "engine_host.json").read_text())
    assert res["finish"] == {"length": r}  # tags and eos masked: each request spends its budget
    assert res["tokens"] == r * (k * n + take)  # k steps of n tokens, then the takeaway
    assert 0 < res["graphs"] < res["steps"]  # the prompts' forward is eager, the decode steps are graph steps
    assert {"schedule", "forward", "build", "sample", "state"} <= set(res["phase_ms_per_step"])
    assert res["ops_per_step"]["forward"] > 0  # the dispatch-mode rerun counted the forward's torch ops
