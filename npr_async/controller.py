"""The controller: one strictly on-policy RL step after another, over the Ray actors (DESIGN.md).

    (1) learner broadcasts weights v_k ──► every rollout generator (version handshake)
    (2) prompt shards ──► rollout generators ──ZMQ──► verifier pool ──ZMQ──► replay buffer
    (3) the learner pulls complete groups from the buffer while rollouts still run (streaming)
    (4) all B×G samples of v_k in: one optimizer step ──► v_{k+1}

Every wait is bounded and its timeout names the actor. A rollout generator that dies mid-step is
replaced, the weight group re-formed, and the samples the buffer still misses re-dispatched: the buffer
counts each (prompt, sample) once, whoever delivers it.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import ray

from actors.buffer import ReplayBuffer
from actors.learner import Learner
from actors.rollout import RolloutGenerator, make_request
from actors.verifier_pool import VerifierPool
from npr_async.config import Config, to_dict


def init_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if cfg.controller.ray_address:
        ray.init(address=cfg.controller.ray_address, log_to_driver=False)
        return
    need = (cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker + cfg.learner.num_workers * cfg.learner.num_cpus
            + cfg.verifier.num_workers * cfg.verifier.num_cpus_per_worker + 1)
    ray.init(num_cpus=max(os.cpu_count() or 1, int(need) + 1), include_dashboard=False, log_to_driver=False,
             configure_logging=False)


class Cluster:
    """The actor handles of one run, and how to (re)build each."""

    def __init__(self, cfg: Config, model_dir: str, train_rows: list[dict], resume: str | None = None):
        self.cfg, self.model_dir = cfg, model_dir
        self.cfg_dict = to_dict(cfg)
        device = lambda gpus: "cuda" if gpus > 0 else "cpu"  # noqa: E731
        self.rollout_device = device(cfg.rollout.num_gpus_per_worker)
        self.buffer = ray.remote(ReplayBuffer).options(num_cpus=0.05, max_concurrency=8).remote(
            cfg.transport.zmq_scheme, cfg.transport.zmq_hwm, cfg.buffer.dynamic_sampling)
        self.buffer_address = ray.get(self.buffer.address.remote(), timeout=60)
        self.verifiers = VerifierPool(cfg.verifier, tasks=train_rows)
        self.verifier_addresses = self.verifiers.serve(self.buffer_address, cfg.transport.zmq_scheme)
        lc = cfg.learner
        self.learners = [ray.remote(Learner).options(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, max_concurrency=2)
                         .remote(model_dir, self.cfg_dict, device(lc.num_gpus), resume, rank, lc.num_workers)
                         for rank in range(lc.num_workers)]
        self.learner = self.learners[0]  # rank 0: the weight version, the weight group
        self.rollouts = [self._new_rollout(i) for i in range(cfg.rollout.num_workers)]
        if lc.num_workers > 1:  # the ranks' process group, then FSDP, on every rank at once
            addr = _get([self.learner.rendezvous.remote()], 600, "learner rank 0 to start")[0]
            _get([r.setup.remote(addr) for r in self.learners], 600, "the learner ranks to form their group")
        _get([r.ready.remote() for r in self.learners + self.rollouts], 600, "actors to start")
        self.form_weight_group()

    def _new_rollout(self, i: int):
        c = self.cfg.rollout
        actor = ray.remote(RolloutGenerator).options(
            num_cpus=c.num_cpus_per_worker, num_gpus=c.num_gpus_per_worker).remote(
            f"rollout-{i}", self.model_dir, self.cfg_dict, self.rollout_device)
        actor.connect_output.remote(self.verifier_addresses[i % len(self.verifier_addresses)])
        return actor

    def replace_rollout(self, i: int) -> None:
        try:
            ray.kill(self.rollouts[i])
        except Exception:
            pass
        self.rollouts[i] = self._new_rollout(i)
        _get([self.rollouts[i].ready.remote()], 600, f"replacement rollout-{i} to start")
        self.form_weight_group()

    def form_weight_group(self) -> None:
        """Learner = rank 0, generator i = rank i + 1. Collective: all join at once."""
        t = self.cfg.transport.recv_timeout_s
        _get([self.learner.close_weights.remote()], t, "the learner to close the old weight group")
        world = 1 + len(self.rollouts)
        addr = _get([self.learner.open_weights.remote(world)], t, "learner to open the weight group")[0]
        _get([self.learner.join_weights.remote()]
             + [r.join_weights.remote(i + 1, world, addr) for i, r in enumerate(self.rollouts)],
             t, "the weight group to form")

    def connect_outputs(self) -> None:
        """Point generator i at verifier actor i mod N (after the verifier pool replaced an actor)."""
        self.verifier_addresses = list(self.verifiers.addresses)
        _get([r.connect_output.remote(self.verifier_addresses[i % len(self.verifier_addresses)])
              for i, r in enumerate(self.rollouts)], 60, "generators to connect to the verifier pool")

    def save_learner(self, out_dir: str, timeout_s: float = 600) -> str:
        """A checkpoint of the learner (every rank takes part in gathering the full state; rank 0 writes)."""
        return _get([r.save.remote(out_dir) for r in self.learners], timeout_s, f"the learner to save {out_dir}")[0]

    def sync_weights(self, version: int) -> float:
        t0 = time.perf_counter()
        _get([r.broadcast.remote() for r in self.learners] + [r.receive_weights.remote(version) for r in self.rollouts],
             self.cfg.transport.recv_timeout_s, f"weights v{version} to reach every rollout generator")
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        for name, fn in (("buffer", lambda: self.buffer.close.remote()),
                         ("verifiers", self.verifiers.shutdown)):
            try:
                ref = fn()
                if ref is not None:
                    ray.get(ref, timeout=30)
            except Exception:
                pass
        for actor in [*self.learners, self.buffer, *self.rollouts]:
            try:
                ray.kill(actor)
            except Exception:
                pass


def _get(refs: list, timeout_s: float, what: str) -> list:
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"controller: timed out after {timeout_s:.0f}s waiting for {what}") from None


def step_prompts(rows: list[dict], step: int, n: int, seed: int) -> list[dict]:
    """The step's prompts: a seeded shuffle per epoch, so resuming at step k picks the same prompts."""
    per_epoch = max(1, len(rows) // n)
    epoch, k = divmod(step, per_epoch)
    order = list(range(len(rows)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [rows[i] for i in order[k * n:(k + 1) * n]]


def run_step(cluster: Cluster, step: int, rows: list[dict], on_dispatch=None) -> dict:
    """One strictly on-policy step; returns its metrics."""
    cfg = cluster.cfg
    timeout = cfg.controller.step_timeout_s
    version = _get([cluster.learner.version.remote()], 60, "the learner's weight version")[0]
    sync_s = cluster.sync_weights(version)
    G = cfg.rollout.samples_per_prompt
    _get([cluster.buffer.begin_step.remote(step, version, [str(r["id"]) for r in rows], G)], 60, "the replay buffer")
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    learner_refs = [r.train_step.remote(step, cluster.buffer, timeout) for r in cluster.learners]
    n = len(cluster.rollouts)
    pending = {cluster.rollouts[i].generate.remote(make_request(step, version, rows[i::n], G)): i
               for i in range(n) if rows[i::n]}
    if on_dispatch is not None:
        on_dispatch(step, cluster)
    reports, restarts = [], 0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=max(deadline - time.monotonic(), 0.01))
        if not done:
            names = sorted(f"rollout-{i}" for i in pending.values())
            raise TimeoutError(f"controller: step {step}: {', '.join(names)} did not finish within {timeout:.0f}s")
        i = pending.pop(done[0])
        try:
            reports.append(ray.get(done[0]))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError):
            restarts += 1
            if restarts > 3 * n:
                raise RuntimeError(f"controller: step {step}: rollout generators keep dying ({restarts} restarts)")
            cluster.replace_rollout(i)
            cluster.sync_weights(version)
            pending.update(_redispatch(cluster, step, version, rows[i::n], only_generator=i))
    rollout_s = time.perf_counter() - t0
    recovered = _recover_lost(cluster, step, version, rows, deadline, reports)
    metrics = _get(learner_refs, max(deadline - time.monotonic(), 1), f"the learner to finish step {step}")[0]
    stats = _get([cluster.buffer.stats.remote()], 60, "the replay buffer's stats")[0]
    tokens = sum(r.num_tokens for r in reports)
    metrics.update(version=version, weight_sync_s=sync_s, rollout_s=rollout_s,
                   step_s=time.perf_counter() - t0 + sync_s, rollout_tokens=tokens,
                   tokens_per_s=tokens / max(rollout_s, 1e-9), rollout_restarts=restarts,
                   recovered_samples=recovered,
                   rollout_actor_s=max((r.seconds for r in reports), default=0.0),
                   rollout_actor_min_s=min((r.seconds for r in reports), default=0.0),
                   # the generators' garbage-collector pauses (the slowest one's ms; full collections, all of them)
                   rollout_gc_ms=max((r.metrics.get("gc_ms", 0.0) for r in reports), default=0.0),
                   rollout_gc_full=sum(r.metrics.get("gc_full", 0.0) for r in reports),
                   # the longest a generator sat waiting for its GPU's tokens: near rollout_actor_s, GPU-bound;
                   # far below it, the generators' host work (or CPU contention) sets the pace
                   rollout_wait_s=max((r.metrics.get("wait_ms", 0.0) / 1e3 for r in reports), default=0.0),
                   # the most seconds a generator spent compiling Triton kernels mid-call (shapes new to its
                   # process): when a slow early step on a fresh machine is that, this says so
                   rollout_jit_s=max((r.metrics.get("jit_ms", 0.0) / 1e3 for r in reports), default=0.0),
                   stale_dropped=stats["stale_dropped"], duplicates=stats["duplicates"],
                   transport_lost=stats["transport_lost"])
    return metrics


def _redispatch(cluster: Cluster, step: int, version: int, rows: list[dict], only_generator: int | None = None):
    """Ask for the samples of `rows` that the buffer still misses: {ref: generator index}."""
    missing = _get([cluster.buffer.missing.remote()], 60, "the replay buffer")[0]
    redo_rows = [r for r in rows if missing.get(str(r["id"]))]
    targets = [only_generator] if only_generator is not None else list(range(len(cluster.rollouts)))
    pending = {}
    for k, i in enumerate(targets):
        part = redo_rows[k::len(targets)]
        if part:
            only = {str(r["id"]): missing[str(r["id"])] for r in part}
            req = make_request(step, version, part, cluster.cfg.rollout.samples_per_prompt)
            pending[cluster.rollouts[i].generate.remote(req, only)] = i
    return pending


def _recover_lost(cluster: Cluster, step: int, version: int, rows: list[dict], deadline: float, reports) -> int:
    """Every generator has reported; samples the buffer still misses after a grace period were lost on the
    way (a verifier actor died with them, or the transport dropped them). Replace dead verifier actors,
    re-point the generators, and generate the missing samples again. Returns how many were redone."""
    grace = 2 * cluster.cfg.verifier.timeout_s + 5  # time for what is still being verified
    redone = 0
    for attempt in range(3):
        until = min(time.monotonic() + grace, deadline)
        while True:
            missing = _get([cluster.buffer.missing.remote()], 60, "the replay buffer")[0]
            count = sum(len(v) for v in missing.values())
            if count == 0 or time.monotonic() >= until:
                break
            time.sleep(0.2)
        if count == 0:
            return redone
        if time.monotonic() >= deadline:
            break
        if cluster.verifiers.heal():
            cluster.connect_outputs()
        redone += count
        pending = _redispatch(cluster, step, version, rows)
        try:
            reports += _get(list(pending), max(deadline - time.monotonic(), 1), f"re-dispatched samples of step {step}")
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError):
            continue  # a generator died meanwhile: the next attempt re-dispatches again
    raise TimeoutError(f"controller: step {step}: {count} samples never reached the replay buffer "
                       f"(verifier pool: {cluster.verifier_addresses}); gave up after {attempt + 1} re-dispatches")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"
