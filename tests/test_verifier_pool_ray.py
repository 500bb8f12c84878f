"""The verifier pool as Ray actors: fed by calls and over ZeroMQ; a crashing verifier never takes an actor
down. One local loopback cluster for the module."""
from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from actors.verifier_pool import VerifierPool, wait_served  # noqa: E402
from npr_async.config import VerifierConfig  # noqa: E402
from npr_async.messages import Trajectory, VerifiedTrajectory  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
NPR = ("<guideline>\n<plan>1: add the numbers</plan>\n</guideline>\n<step>\n1: 2 + 2 = 4 exactly\n</step>\n"
       "<takeaway>\nthe sum is four\n</takeaway>\n\\boxed{4}")


@pytest.fixture(scope="module")
def pool():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}})
    cfg = VerifierConfig(num_workers=2, num_cpus_per_worker=0.25, processes_per_worker=1, timeout_s=3.0)
    p = VerifierPool(cfg, tasks=[{"id": "four", "answer": "4"}, {"id": "five", "answer": "5"}])
    yield p
    p.shutdown()
    ray.shutdown()


def test_ray_calls_and_crashes(pool):
    tasks = [{"id": "a", "answer": "4"}, {"id": "c", "answer": "4", "verifier": "test_verifier_plugins:CrashVerifier"},
             {"id": "b", "answer": "5"}, {"id": "r", "answer": "4", "verifier": "test_verifier_plugins:RaisingVerifier"}]
    out = pool.verify_batch(tasks, [NPR] * 4)
    assert [v.correct for v in out] == [True, False, False, False]
    assert "died" in out[1].details["error"] and "boom" in out[3].details["error"] and "error" not in out[2].details
    stats = pool.stats()  # both actors are alive and answering
    assert len(stats) == 2 and sum(s["replaced"] for s in stats) == 1
    n = 60
    t = time.monotonic()
    many = pool.verify_batch([{"id": f"q{i}", "answer": f"\\frac{{{i}}}{{{i + 1}}}"} for i in range(n)],
                             [NPR.replace("\\boxed{4}", f"\\boxed{{{i / (i + 1):.9f}}}") for i in range(n)])
    print(f"\nRay pool (2 actors x 1 process): math (fraction vs decimal) {n / (time.monotonic() - t):.0f} verdicts/s")
    assert all(v.correct for v in many)


def _traj(prompt_id: str, text: str, idx: int) -> Trajectory:
    return Trajectory.build(token_ids=[1, 2, 3], positions=[0, 1, 2], segment_ids=[0, 0, 0], parents=[[]],
                            logprobs=[None, -0.5, -0.2], sampled=[False, True, True], prompt_id=prompt_id,
                            sample_idx=idx, prompt_len=1, finish_reason="stop", text=text, version=7)


def test_zmq_feeding(pool):
    from npr_async.transport.endpoints import make_endpoint
    from npr_async.transport.zmq import TrajectoryReceiver, TrajectorySender

    rx = TrajectoryReceiver(make_endpoint("ipc", "buffer"), timeout_s=60)
    addresses = pool.serve(rx.address)
    assert len(addresses) == 2
    sent = [("four", NPR), ("five", NPR), ("four", "no structure, \\boxed{4}"), ("ghost", NPR)] * 5
    senders = [TrajectorySender(a, name=f"rollout-{k}") for k, a in enumerate(addresses)]
    for i, (pid, text) in enumerate(sent):
        senders[i % 2].send(_traj(pid, text, i))
    got = {}
    for _ in sent:
        msg = rx.recv(timeout_s=60).body
        assert isinstance(msg, VerifiedTrajectory)
        got[msg.trajectory.sample_idx] = msg
    for s in senders:
        s.close()
    wait_served(pool, len(sent))
    stats = pool.stop()
    rx.close()
    assert sorted(got) == list(range(len(sent))) and rx.tracker.lost == 0
    for i, (pid, text) in enumerate(sent):
        v = got[i]
        assert v.trajectory.version == 7 and v.trajectory.ids().tolist() == [1, 2, 3]
        if pid == "ghost":
            assert v.reward == -1.0 and "no task for prompt_id" in v.details["error"]
        else:
            assert v.correct is (pid == "four") and v.verifier == "math"
            assert v.format_ok is (text == NPR)  # Stage 3 filter: malformed flagged, reward kept
    assert all(s["error"] is None and not s["serving"] for s in stats)
