"""The verifier pool: a process pool that survives crashing and hanging verifiers, Ray actors fed by calls
and over ZeroMQ, and its verdicts per second (printed; run with -s to see them)."""
from __future__ import annotations

import os
import time

import pytest

from npr_async.config import VerifierConfig
from npr_async.verifiers.procpool import VerifierProcessPool
from npr_async.verifiers.sandbox import bwrap_works, sandbox_python

TESTS = os.path.dirname(os.path.abspath(__file__))
NPR = ("<guideline>\n<plan>1: add the numbers</plan>\n</guideline>\n<step>\n1: 2 + 2 = 4 exactly\n</step>\n"
       "<takeaway>\nthe sum is four\n</takeaway>\n\\boxed{4}")
ADD = {"id": "add", "tests": [{"input": "2 3\n", "output": "5\n"}, {"input": "-1 1\n", "output": "0\n"}]}
ADD_OK = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
needs_bwrap = pytest.mark.skipif(bwrap_works(sandbox_python()) is not None, reason="bubblewrap cannot run here")


def _plugin(name):
    return {"id": name, "answer": "4", "verifier": f"test_verifier_plugins:{name}"}


def _sandbox_uids_alive() -> list[int]:
    alive = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{p}").st_uid >= 200_000:
                alive.append(int(p))
        except OSError:
            pass
    return alive


@pytest.fixture(scope="module")
def procpool():
    os.environ["PYTHONPATH"] = TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")  # plug-ins for spawned workers
    cfg = VerifierConfig(timeout_s=2.0, processes_per_worker=2, format_reward="filter")
    with VerifierProcessPool(cfg) as pool:
        yield pool


def test_crashes_and_hangs_become_error_verdicts(procpool):
    tasks = [{"id": "m", "answer": "4"}, _plugin("HangVerifier"), _plugin("CrashVerifier"),
             _plugin("SegfaultVerifier"), _plugin("RaisingVerifier"), {"id": "w", "answer": "5"},
             {"id": "x", "verifier": "no.such:Thing", "answer": "1"}]
    before = procpool.stats["replaced"]
    t = time.monotonic()
    out = procpool.verify_batch(tasks, [NPR] * len(tasks))
    assert time.monotonic() - t < 8  # the hang cost one timeout, in parallel with the rest
    assert out[0].correct and out[0].reward == 1.0 and out[0].details["format_ok"]
    assert out[1].details.get("timed_out") and "timed out" in out[1].details["error"]
    assert "died" in out[2].details["error"] and "died" in out[3].details["error"]
    assert "boom in user code" in out[4].details["error"] and out[4].details["verifier"].endswith("RaisingVerifier")
    assert not out[5].correct and out[5].reward == -1.0 and "error" not in out[5].details
    assert "cannot import module" in out[6].details["error"]
    assert all(v.reward == -1.0 for v in out[1:])
    assert procpool.stats["replaced"] - before == 3
    again = procpool.verify_batch([{"id": "m", "answer": "4"}] * 4, [NPR] * 4)  # replaced workers serve
    assert all(v.correct for v in again)


@needs_bwrap
def test_code_tasks_and_a_sandbox_outliving_the_pool_timeout(procpool):
    hang = "import time\ntime.sleep(600)\n"
    slow = {"id": "slow", "tests": [{"input": "", "output": "x"}]}
    cfg_slow = VerifierConfig(timeout_s=1.5, processes_per_worker=1, code_timeout_s=60.0)
    with VerifierProcessPool(cfg_slow) as pool:  # the sandbox would allow 60 s: the pool kills it at 1.5 s
        victim = pool.workers[0].proc.pid
        [v] = pool.verify_batch([slow], [hang])
        assert v.details.get("timed_out") and v.reward == -1.0 and pool.workers[0].proc.pid != victim
    time.sleep(0.3)
    assert _sandbox_uids_alive() == []  # bwrap --die-with-parent took the sandbox down with the worker
    assert not [d for d in os.listdir("/tmp") if d.startswith(f"npr-sbx-{victim}-")]  # its workdir removed
    out = procpool.verify_batch([ADD, ADD], [ADD_OK, "print(5)"])
    assert out[0].correct and out[0].details["passed"] == 2
    assert not out[1].correct and out[1].details["failure"]["case"] == 1


def test_rates_of_the_process_pool(procpool):
    n = 100
    tasks = [{"id": f"q{i}", "answer": f"\\frac{{{i}}}{{{i + 1}}}"} for i in range(n)]
    responses = [f"{NPR[:-10]}\\boxed{{{i / (i + 1):.9f}}}" for i in range(n)]
    t = time.monotonic()
    out = procpool.verify_batch(tasks, responses)
    rate = n / (time.monotonic() - t)
    assert all(v.correct for v in out), [v.details for v in out if not v.correct][:2]
    print(f"\nprocess pool (2 processes): math {rate:.0f} verdicts/s")
    if bwrap_works(sandbox_python()) is None:
        m = 20
        t = time.monotonic()
        out = procpool.verify_batch([ADD] * m, [ADD_OK] * m)
        print(f"process pool (2 processes): code (2 sandboxed runs each) {m / (time.monotonic() - t):.1f} verdicts/s")
        assert all(v.correct for v in out)
