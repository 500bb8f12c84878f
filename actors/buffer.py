"""ReplayBuffer actor: pulls verified trajectories off ZMQ, keeps the step's groups, streams whole groups out.

A background thread drains the PULL socket into `StepGroups` (so the senders never block on the learner);
the learner calls `take` to get complete groups as soon as they exist. Strictly on-policy: a sample of any
other weight version is refused and counted (`stale_dropped`).
"""
from __future__ import annotations

import threading
import time

from npr_async.groups import StepGroups
from npr_async.messages import VerifiedTrajectory
from npr_async.transport.endpoints import make_endpoint
from npr_async.transport.zmq import TrajectoryReceiver


class ReplayBuffer:
    def __init__(self, scheme: str = "ipc", hwm: int = 1024, dynamic_sampling: bool = False,
                 name: str = "buffer"):
        self.name, self.dynamic_sampling = name, dynamic_sampling
        self.receiver = TrajectoryReceiver(make_endpoint(scheme, name), hwm=hwm, peer="verifier pool")
        self.groups: StepGroups | None = None
        self.early: list[VerifiedTrajectory] = []  # arrived before begin_step (a fast verifier): kept, not lost
        self.totals = {"stale_dropped": 0, "duplicates": 0, "unexpected": 0, "groups_filtered": 0}
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name=f"{name}-recv", daemon=True)
        self._thread.start()

    def address(self) -> str:
        return self.receiver.address

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                env = self.receiver.recv(timeout_s=0.2)
            except TimeoutError:
                continue
            except Exception:  # socket closed under us at shutdown
                if self._stop.is_set():
                    return
                raise
            if isinstance(env.body, VerifiedTrajectory):
                with self._cv:
                    self._add(env.body)
                    self._cv.notify_all()

    def _add(self, item: VerifiedTrajectory) -> None:
        if self.groups is None or item.trajectory.version > self.groups.version:
            self.early.append(item)  # for a step not begun yet
            return
        self.groups.add(item)

    def begin_step(self, step: int, version: int, prompt_ids: list[str], samples_per_prompt: int) -> None:
        with self._cv:
            if self.groups is not None:
                self._fold_counts(self.groups)
            self.groups = StepGroups(step, version, prompt_ids, samples_per_prompt, self.dynamic_sampling)
            early, self.early = self.early, []
            for item in early:
                self._add(item)
            self._cv.notify_all()

    def _fold_counts(self, groups: StepGroups) -> None:
        for key in self.totals:
            self.totals[key] += groups.counts[key]

    def take(self, max_groups: int | None = None, timeout_s: float = 1.0) -> dict:
        """Complete groups, waiting up to `timeout_s` for at least one. `done` once the step has nothing left."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                g = self.groups
                if g is None:
                    raise RuntimeError(f"{self.name}: take() before begin_step()")
                if g.ready or g.complete or time.monotonic() >= deadline:
                    groups = g.take(max_groups)
                    return {"groups": groups, "done": g.drained, "step": g.step}
                self._cv.wait(timeout=max(deadline - time.monotonic(), 0.001))

    def missing(self) -> dict[str, list[int]]:
        with self._cv:
            return self.groups.missing() if self.groups else {}

    def stats(self) -> dict:
        with self._cv:
            counts = dict(self.totals)
            if self.groups is not None:
                for key in counts:
                    counts[key] += self.groups.counts[key]
                counts.update(step=self.groups.step, accepted=self.groups.counts["accepted"],
                              groups_complete=self.groups.counts["groups_complete"])
            counts.update(transport_lost=self.receiver.lost, transport_duplicates=self.receiver.duplicates,
                          transport_malformed=self.receiver.malformed)
            return counts

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.receiver.close()
