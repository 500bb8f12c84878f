"""A process pool for verification: `verify_batch(tasks, responses) -> list[Verdict]`, bounded per task.

Why not concurrent.futures: a hung task must be killable on its own. Each worker is one process with one
pipe, so the task that overran its deadline names the process to SIGKILL; a fresh worker replaces it (also
one that crashed), and the task becomes an error verdict. The caller never sees an exception from a task.
Workers run verifiers in their main thread, so math-verify's SIGALRM time bounds work there, and each
worker is a child subreaper for its sandboxes (see sandbox.py).
"""
from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections import deque
from multiprocessing.connection import wait
from typing import Any

import msgspec

from npr_async.verifiers.base import Verdict, error_verdict
from npr_async.verifiers.reaper import become_subreaper, reap_adopted_sandboxes
from npr_async.verifiers.sandbox import remove_workdirs

_CTX = mp.get_context("spawn")  # no fork of a threaded parent (Ray actors, ZMQ I/O threads)


def _worker_main(conn, cfg_dict: dict) -> None:
    from npr_async.config import VerifierConfig
    from npr_async.verifiers import get_verifier, task_verifier_name
    from npr_async.verifiers.format import combine

    cfg = msgspec.convert(cfg_dict, VerifierConfig)
    try:  # import the heavy parts (sympy, math-verify) before the first task's clock starts
        get_verifier(cfg.default, cfg)
        # a first equivalence check warms math-verify's LaTeX parser (about a second of one-time work)
        get_verifier("math", cfg).verify({"answer": "\\frac{1}{2}"}, "\\boxed{0.5}")
    except Exception:
        pass  # a bad default verifier shows up as each task's error verdict
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task, response = msg
        name = task_verifier_name(task, cfg.default)
        try:
            verdict = get_verifier(name, cfg).verify(task, response)
            if not isinstance(verdict, Verdict):  # a plug-in may return any Verdict-shaped object
                verdict = Verdict(reward=float(verdict.reward), correct=bool(verdict.correct),
                                  details=dict(getattr(verdict, "details", {}) or {}))
        except Exception as e:
            tb = traceback.format_exc(limit=4)
            verdict = error_verdict(f"{type(e).__name__}: {e}"[:1000], traceback=tb[-2000:])
        verdict.details["verifier"] = name
        try:
            verdict = combine(verdict, response, cfg.format_reward)
            conn.send(verdict)
        except Exception as e:  # unpicklable details from a plug-in, a broken pipe: report what we can
            try:
                conn.send(error_verdict(f"could not return the verdict: {type(e).__name__}: {e}"[:500]))
            except OSError:
                return


class _Worker:
    def __init__(self, cfg_dict: dict):
        self.conn, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=_worker_main, args=(child, cfg_dict), daemon=True, name="verifier")
        self.proc.start()
        child.close()
        self.job: int | None = None  # index of the task it runs
        self.deadline = 0.0
        self.ready = False  # set by its "ready" message: start-up time never counts against a task

    def wait_ready(self, timeout_s: float) -> None:
        if not self.ready:
            if not self.conn.poll(timeout_s) or self.conn.recv() != "ready":
                raise RuntimeError(f"verifier process {self.proc.pid} did not start within {timeout_s}s")
            self.ready = True

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL; bwrap's --die-with-parent takes its sandbox down with it
        self.proc.join(5)
        self.conn.close()


class VerifierProcessPool:
    """`processes` workers running the verifiers of `config` (a VerifierConfig)."""

    START_TIMEOUT_S = 120.0

    def __init__(self, config: Any, processes: int | None = None, timeout_s: float | None = None):
        self.cfg_dict = msgspec.to_builtins(config)
        self.format_reward = config.format_reward
        self.processes = processes or config.processes_per_worker
        self.timeout_s = timeout_s or config.timeout_s
        become_subreaper()  # sandboxes of a killed worker come to us, to be reaped
        self.workers = [_Worker(self.cfg_dict) for _ in range(self.processes)]
        for w in self.workers:
            w.wait_ready(self.START_TIMEOUT_S)
        self.stats = {"tasks": 0, "timeouts": 0, "crashes": 0, "errors": 0, "replaced": 0}

    def verify_batch(self, tasks: list[dict], responses: list[str]) -> list[Verdict]:
        if len(tasks) != len(responses):
            raise ValueError(f"verify_batch: {len(tasks)} tasks but {len(responses)} responses")
        results: list[Verdict | None] = [None] * len(tasks)
        todo = deque(range(len(tasks)))
        while todo or any(w.job is not None for w in self.workers):
            for w in self.workers:  # hand out work
                if w.job is None and todo and w.ready:
                    i = todo.popleft()
                    try:
                        w.conn.send((tasks[i], responses[i]))
                    except Exception as e:  # unpicklable task: only this task fails
                        results[i] = self._failed(f"cannot send the task to a worker: {e!r}", "send", responses[i])
                        continue
                    w.job, w.deadline = i, time.monotonic() + self.timeout_s
            starting = [w for w in self.workers if not w.ready]
            busy = [w for w in self.workers if w.job is not None]
            if not busy and not starting:
                continue
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic()) if busy else self.START_TIMEOUT_S
            ready = wait([w.conn for w in busy + starting], timeout=timeout)
            for w in starting:
                if w.conn in ready:  # a replacement finished starting: it takes work from the next round
                    try:
                        w.wait_ready(1.0)
                    except (EOFError, OSError, RuntimeError):  # died while starting: try again, boundedly
                        self.stats["start_failures"] = self.stats.get("start_failures", 0) + 1
                        if self.stats["start_failures"] > 10 * self.processes:
                            raise RuntimeError("verifier processes keep dying at start-up") from None
                        self._replace(w)
            if starting and not busy and not ready:
                raise RuntimeError(f"no verifier process could start within {self.START_TIMEOUT_S}s")
            for w in busy:
                i = w.job
                if w.conn in ready:
                    try:
                        results[i] = w.conn.recv()
                        w.job = None
                        continue
                    except (EOFError, OSError):  # the process died mid-task (segfault, os._exit, OOM kill)
                        code = w.proc.exitcode if not w.proc.is_alive() else "?"
                        results[i] = self._failed(f"verifier process died (exit code {code})", "crashes",
                                                  responses[i])
                elif time.monotonic() >= w.deadline:
                    results[i] = self._failed(f"verifier timed out after {self.timeout_s}s", "timeouts",
                                              responses[i], timed_out=True)
                else:
                    continue
                self._replace(w)
        self.stats["tasks"] += len(tasks)
        self.stats["errors"] += sum(1 for r in results if "error" in r.details)
        return results  # type: ignore[return-value]

    def _failed(self, why: str, counter: str, response: str, **extra) -> Verdict:
        from npr_async.verifiers.format import combine

        self.stats[counter] = self.stats.get(counter, 0) + 1
        return combine(error_verdict(why, **extra), response, self.format_reward)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        reap_adopted_sandboxes()
        remove_workdirs(w.proc.pid)
        fresh = _Worker(self.cfg_dict)
        w.conn, w.proc, w.job, w.ready = fresh.conn, fresh.proc, None, False
        self.stats["replaced"] += 1

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self.workers:
            w.proc.join(2)
            if w.proc.is_alive():
                w.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
