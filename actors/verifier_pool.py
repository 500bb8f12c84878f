"""The verifier pool: N Ray actors (`verifier.num_workers`, `num_cpus_per_worker`), each with a process pool
of `processes_per_worker` verifier processes.

Two ways in, one core (`VerifierProcessPool.verify_batch`):
- Ray calls: `pool.verify_batch(tasks, responses) -> list[Verdict]` splits the batch across the actors.
- ZeroMQ: `pool.serve(out_address) -> [in_address per actor]`. Each actor binds a PULL for `Trajectory`
  (rollout generators connect to one of the addresses), verifies what arrives in micro-batches, and PUSHes
  `VerifiedTrajectory` to `out_address` (the replay buffer's receiver). The task of a trajectory is looked up
  by `prompt_id` in the rows given to `set_tasks`. The loop is a thin wrapper; a crash or hang of a
  verifier is an error verdict from the core, never an actor failure.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import ray

from npr_async.verifiers.base import Verdict, error_verdict
from npr_async.verifiers.procpool import VerifierProcessPool


class VerifierWorker:
    """One actor: a process pool plus an optional ZMQ serving thread."""

    def __init__(self, config: Any, name: str = "verifier-0"):
        self.cfg, self.name = config, name
        self.pool = VerifierProcessPool(config)
        self.lock = threading.Lock()  # the process pool serves one batch at a time
        self.tasks: dict[str, dict] = {}
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.served = 0
        self.error: str | None = None

    def ready(self) -> bool:
        return True

    def set_tasks(self, rows: list[dict]) -> int:
        self.tasks.update({str(r["id"]): r for r in rows})
        return len(self.tasks)

    def verify_batch(self, tasks: list[dict], responses: list[str]) -> list[Verdict]:
        with self.lock:
            return self.pool.verify_batch(tasks, responses)

    def stats(self) -> dict:
        return {**self.pool.stats, "served": self.served, "error": self.error, "serving": self.thread is not None
                and self.thread.is_alive()}

    # --- ZeroMQ feeding ------------------------------------------------------------------------------
    def serve(self, out_address: str, scheme: str = "ipc", hwm: int = 1024, batch: int = 0) -> str:
        """Bind the PULL, start the loop in a thread; returns the address rollout generators PUSH to."""
        from npr_async.transport.endpoints import make_endpoint
        from npr_async.transport.zmq import TrajectoryReceiver, TrajectorySender

        if self.thread is not None:
            raise RuntimeError(f"{self.name} is already serving")
        rx = TrajectoryReceiver(make_endpoint(scheme, self.name), hwm=hwm, peer="rollout generators")
        tx = TrajectorySender(out_address, name=self.name, hwm=hwm, peer="replay buffer")
        batch = batch or 4 * self.pool.processes  # enough to keep every process busy between receives
        self.stop_event.clear()
        self.thread = threading.Thread(target=self._loop, args=(rx, tx, batch), daemon=True, name=self.name)
        self.thread.start()
        return rx.address

    def _loop(self, rx, tx, batch: int) -> None:
        from npr_async.messages import Trajectory, VerifiedTrajectory
        from npr_async.transport.streams import TransportTimeout

        try:
            while not self.stop_event.is_set():
                try:
                    envs = [rx.recv(timeout_s=0.2)]
                except TransportTimeout:
                    continue
                while len(envs) < batch and (env := rx.try_recv()) is not None:
                    envs.append(env)
                trajs = [e.body for e in envs if isinstance(e.body, Trajectory)]
                for traj, verdict in zip(trajs, self._verify_trajectories(trajs)):
                    details = dict(verdict.details)
                    tx.send(VerifiedTrajectory(
                        trajectory=traj, reward=verdict.reward, correct=verdict.correct,
                        verifier=str(details.get("verifier", "")), format_ok=bool(details.get("format_ok", True)),
                        details=details))
                    self.served += 1
        except Exception as e:  # e.g. the buffer stopped draining: record it for stats(), stop serving
            self.error = f"{type(e).__name__}: {e}"
        finally:
            rx.close()
            tx.close()

    def _verify_trajectories(self, trajs: list) -> list[Verdict]:
        known = [i for i, t in enumerate(trajs) if t.prompt_id in self.tasks]
        out: list[Verdict] = [error_verdict(f"no task for prompt_id {t.prompt_id!r} (set_tasks first)")
                              for t in trajs]
        verdicts = self.verify_batch([self.tasks[trajs[i].prompt_id] for i in known],
                                     [trajs[i].text for i in known])
        for i, v in zip(known, verdicts):
            out[i] = v
        return out

    def stop(self, timeout_s: float = 10.0) -> dict:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout_s)
            if self.thread.is_alive():
                raise TimeoutError(f"{self.name}: serving loop did not stop within {timeout_s}s")
            self.thread = None
        return self.stats()

    def close(self) -> None:
        self.stop()
        self.pool.close()


VerifierActor = ray.remote(VerifierWorker)


class VerifierPool:
    """Driver-side handle: starts the actors from the config and spreads work over them."""

    def __init__(self, config: Any, tasks: list[dict] | None = None, ready_timeout_s: float = 120.0):
        self.config, self.tasks = config, list(tasks or [])
        self.actors = [self._new_actor(i) for i in range(config.num_workers)]
        self.timeout_s = config.timeout_s
        self.serving: tuple[str, str] | None = None  # (out_address, scheme) once serving
        self.addresses: list[str] = []
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"verifier actors not ready within {ready_timeout_s}s "
                               f"({config.num_workers} × {config.num_cpus_per_worker} CPUs asked)") from None
        if tasks:
            self.set_tasks(tasks)

    def _new_actor(self, i: int):
        opts = {"num_cpus": self.config.num_cpus_per_worker, "max_concurrency": 4}  # serve loop + calls
        return VerifierActor.options(**opts).remote(self.config, f"verifier-{i}")

    def set_tasks(self, rows: list[dict]) -> None:
        self.tasks = list(rows)
        ray.get([a.set_tasks.remote(rows) for a in self.actors])

    def verify_batch(self, tasks: list[dict], responses: list[str], timeout_s: float | None = None) -> list[Verdict]:
        n = len(self.actors)
        chunks = [(tasks[k::n], responses[k::n]) for k in range(n)]  # strided: neighbours often share a cost
        refs = [a.verify_batch.remote(t, r) for a, (t, r) in zip(self.actors, chunks) if t]
        per_actor = -(-len(tasks) // max(1, n))
        limit = timeout_s or (self.timeout_s * (per_actor + 1) + 60.0)  # every task may run to its own timeout
        try:
            parts = ray.get(refs, timeout=limit)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"verifier pool: no verdicts for {len(tasks)} tasks within {limit:.0f}s") from None
        out: list[Verdict | None] = [None] * len(tasks)
        for k, part in enumerate(parts):
            out[k::n] = part
        return out  # type: ignore[return-value]

    def serve(self, out_address: str, scheme: str = "ipc") -> list[str]:
        self.serving = (out_address, scheme)
        self.addresses = ray.get([a.serve.remote(out_address, scheme) for a in self.actors])
        return self.addresses

    def heal(self, timeout_s: float = 10.0) -> list[int]:
        """Replace every actor that does not answer (killed, node lost) with a new one serving the same
        output; returns the indices replaced (their `addresses[i]` changed)."""
        replaced = []
        for i, actor in enumerate(self.actors):
            try:
                ray.get(actor.ready.remote(), timeout=timeout_s)
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            try:
                ray.kill(actor)
            except Exception:
                pass
            self.actors[i] = self._new_actor(i)
            if self.tasks:
                ray.get(self.actors[i].set_tasks.remote(self.tasks), timeout=120)
            if self.serving is not None:
                self.addresses[i] = ray.get(self.actors[i].serve.remote(*self.serving), timeout=120)
            replaced.append(i)
        return replaced

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors])

    def stop(self) -> list[dict]:
        return ray.get([a.stop.remote() for a in self.actors])

    def shutdown(self) -> None:
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=30)
        finally:
            for a in self.actors:
                ray.kill(a)
        self.actors = []


def wait_served(pool: VerifierPool, n: int, timeout_s: float = 60.0) -> None:
    """Block until the actors have pushed `n` verdicts in all (tests and benchmarks)."""
    deadline = time.monotonic() + timeout_s
    while sum(s["served"] for s in pool.stats()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"verifier pool served fewer than {n} trajectories within {timeout_s}s")
        time.sleep(0.05)
