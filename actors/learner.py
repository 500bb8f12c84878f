"""Learner actor: the Trainer (one model definition with the engine), weight broadcast at rank 0.

Streaming on-policy step: complete groups are pulled from the replay buffer as they appear and their
unscaled gradient is accumulated at once; the batch std and sequence count, known only when the step's
last group is in, scale the accumulated gradient once before the optimizer step (DESIGN.md).
"""
from __future__ import annotations

import time

import msgspec
import torch

from npr_async.config import Config


class Learner:
    """One learner rank. With `learner.num_workers` > 1 the controller starts one actor per rank, calls
    `rendezvous` on rank 0 and then `setup` on all at once (a torch.distributed group, FSDP over it); every
    rank pulls groups from the same buffer (each group goes to whichever rank takes it) and backprops them in
    lockstep rounds, one per poll (`Trainer.accumulate_round`), takes the optimizer step together, and joins
    the full-weight gathers of a broadcast that rank 0 sends."""

    def __init__(self, model_dir: str, config: Config | dict, device: str = "cpu", resume: str | None = None,
                 rank: int = 0, world_size: int = 1):
        self.cfg = config if isinstance(config, Config) else msgspec.convert(config, Config)
        self.model_dir, self.device, self.resume = model_dir, device, resume
        self.rank, self.world_size = rank, world_size
        if device == "cpu":
            torch.set_num_threads(1)
        self.trainer, self.weights, self._store = None, None, None
        if world_size == 1:
            self.setup()

    def rendezvous(self) -> str:
        """Rank 0: bind the learner group's store; returns its host:port for `setup` on every rank."""
        import ray
        from torch.distributed import TCPStore

        host = ray.util.get_node_ip_address()
        self._store = TCPStore(host, 0, self.world_size, is_master=True, wait_for_workers=False,
                               timeout=_seconds(self.cfg.controller.step_timeout_s))
        return f"{host}:{self._store.port}"

    def setup(self, store_addr: str | None = None) -> int:
        """Join the learner group (all ranks at once) and build the Trainer; returns the weight version."""
        from engine.loader import load_model
        from npr_async.training.trainer import Trainer

        if self.world_size > 1:
            import torch.distributed as dist
            from torch.distributed import TCPStore

            host, port = store_addr.rsplit(":", 1)
            store = self._store or TCPStore(host, int(port), self.world_size, is_master=False,
                                            timeout=_seconds(self.cfg.controller.step_timeout_s))
            dist.init_process_group("nccl" if self.device == "cuda" else "gloo", store=store, rank=self.rank,
                                    world_size=self.world_size)
        torch.manual_seed(self.cfg.controller.seed)
        model = load_model(self.model_dir, torch.float32, self.device)
        self.trainer = Trainer(model, self.cfg.learner, total_steps=self.cfg.controller.steps,
                               model_dir=self.model_dir)
        if self.resume:
            self.trainer.load(self.resume)
        return self.version()

    def ready(self) -> int:
        return self.version()

    def version(self) -> int:
        """The weight version = optimizer steps taken (0: the starting weights)."""
        return self.trainer.step

    # weights --------------------------------------------------------------------------------------
    def open_weights(self, world_size: int) -> str:
        """Bind the weight-sync control store (rank 0); returns the address the generators join."""
        from npr_async.transport.weights import WeightSender

        t = self.cfg.transport
        self.weights = WeightSender(t.weights, world_size=world_size, timeout_s=t.recv_timeout_s,
                                    bucket_mb=t.bucket_mb, device=self.device)
        return self.weights.address

    def join_weights(self) -> None:
        self.weights.connect()

    def close_weights(self) -> None:
        if self.weights is not None:
            self.weights.close()
            self.weights = None

    def broadcast(self) -> dict:
        t0 = time.perf_counter()
        version = self.version()
        dtype = getattr(torch, self.cfg.model.dtype)  # the generators' dtype; the learner keeps fp32 masters
        if self.rank == 0:
            self.weights.send(self.trainer.named_weights(), version, dtype=dtype)  # cast while packing: no copy
        else:  # each full weight is a gather over the learner ranks: take part, rank 0 sends
            for _ in self.trainer.named_weights():
                pass
        return {"version": version, "seconds": time.perf_counter() - t0}

    # training -------------------------------------------------------------------------------------
    def train_step(self, step: int, buffer, timeout_s: float) -> dict:
        """Consume the step's groups from `buffer` (a ReplayBuffer actor) and take one optimizer step. Metrics
        include the garbage collector's pauses in it (learner_gc_ms; learner_gc_full: full collections, each a
        walk of every object of the process)."""
        from engine.gc_pauses import GcPauses

        with GcPauses() as pauses:
            metrics = self._train_step(step, buffer, timeout_s)
        metrics.update(learner_gc_ms=pauses.ms, learner_gc_full=pauses.full)
        return metrics

    def _train_step(self, step: int, buffer, timeout_s: float) -> dict:
        import ray

        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        waited = computed = 0.0
        held = []  # groups kept for the one-shot path (streaming off)
        seen = 0
        stats = RolloutStats()
        # several ranks step in rounds, so a rank waiting here holds the others' next backward: poll briefly
        poll = 2.0 if self.world_size == 1 else 0.2
        while True:
            w0 = time.perf_counter()
            if w0 > deadline:
                raise TimeoutError(f"learner: step {step} still waiting for groups from the replay buffer "
                                   f"after {timeout_s:.0f}s ({seen} groups received)")
            got = ray.get(buffer.take.remote(timeout_s=min(poll, max(deadline - w0, 0.01))),
                          timeout=max(deadline - w0, 0.01) + 30)
            waited += time.perf_counter() - w0
            if got["step"] != step:
                raise RuntimeError(f"learner: buffer is at step {got['step']}, learner at step {step}")
            c0 = time.perf_counter()
            groups = []
            for group in got["groups"]:
                seen += 1
                stats.add(group)
                groups.append(self._group(group))
            done = got["done"]
            if not self.cfg.learner.streaming:
                held += groups
            elif self.world_size > 1:  # a round in step with the other ranks (each brings what it took)
                done = not self.trainer.accumulate_round(groups, more=not done)
            else:
                for trajs, rewards in groups:
                    self.trainer.accumulate(trajs, rewards)
            computed += time.perf_counter() - c0
            if done:
                break
        c0 = time.perf_counter()
        metrics = self.trainer.finish_step() if self.cfg.learner.streaming else self.trainer.train_step(held)
        computed += time.perf_counter() - c0
        if self.world_size > 1:  # the step's samples over every rank (each took its own groups)
            import torch.distributed as dist

            parts = [None] * self.world_size
            dist.all_gather_object(parts, (stats, seen))
            stats, seen = RolloutStats.merged(p[0] for p in parts), sum(p[1] for p in parts)
        metrics.update(stats.summary())
        metrics.update(groups_in=seen, learner_wait_s=waited, learner_compute_s=computed,
                       learner_s=time.perf_counter() - t0, learner_ranks=self.world_size)
        return metrics

    def _group(self, group) -> tuple[list, list[float]]:
        """A group's trajectories and rewards. Under the `filter` rule (Stage 3) the verifier's format flag
        feeds the structural filter; under `stage1` the format penalty is already in the reward."""
        filtering = self.cfg.verifier.format_reward == "filter"
        trajs = []
        for item in group:
            traj = item.trajectory
            if filtering and not item.format_ok and traj.finish_reason == "stop":
                traj = msgspec.structs.replace(traj, finish_reason="format_error")
            trajs.append(traj)
        return trajs, [item.reward for item in group]

    # checkpoints ----------------------------------------------------------------------------------
    def save(self, out_dir: str) -> str:
        self.trainer.save(out_dir, self.model_dir)
        return out_dir


def _seconds(s: float):
    import datetime

    return datetime.timedelta(seconds=s)


class RolloutStats:
    """What the step's samples say about the policy: accuracy, format, parallel structure, length."""

    def __init__(self):
        self.n = self.correct = self.format_ok = self.forked = self.forks = self.branches = self.tokens = 0
        self.reward = 0.0

    def add(self, group) -> None:
        for item in group:
            t = item.trajectory
            self.n += 1
            self.correct += bool(item.correct)
            self.format_ok += bool(item.format_ok)
            self.reward += item.reward
            self.forked += t.num_forks > 0
            self.forks += t.num_forks
            self.branches += t.num_branches
            self.tokens += t.num_tokens

    @classmethod
    def merged(cls, parts) -> "RolloutStats":
        out = cls()
        for p in parts:
            for k, v in vars(p).items():
                setattr(out, k, getattr(out, k) + v)
        return out

    def summary(self) -> dict:
        n = max(self.n, 1)
        return {"samples": self.n, "accuracy": self.correct / n, "reward": self.reward / n,
                "format_ok": self.format_ok / n, "parallel_trigger_rate": self.forked / n,
                "branches_per_fork": self.branches / max(self.forks, 1), "mean_tokens": self.tokens / n}
