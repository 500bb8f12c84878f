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
    def __init__(self, model_dir: str, config: Config | dict, device: str = "cpu", resume: str | None = None):
        from engine.loader import load_model
        from npr_async.training.trainer import Trainer

        self.cfg = config if isinstance(config, Config) else msgspec.convert(config, Config)
        self.model_dir, self.device = model_dir, device
        if device == "cpu":
            torch.set_num_threads(1)
        torch.manual_seed(self.cfg.controller.seed)
        model = load_model(model_dir, torch.float32, device)
        self.trainer = Trainer(model, self.cfg.learner, total_steps=self.cfg.controller.steps, model_dir=model_dir)
        if resume:
            self.trainer.load(resume)
        self.weights = None

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
        self.weights.send(self.trainer.named_weights(), version, dtype=dtype)  # cast while packing: no copy
        return {"version": version, "seconds": time.perf_counter() - t0}

    # training -------------------------------------------------------------------------------------
    def train_step(self, step: int, buffer, timeout_s: float) -> dict:
        """Consume the step's groups from `buffer` (a ReplayBuffer actor) and take one optimizer step."""
        import ray

        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        waited = computed = 0.0
        held = []  # groups kept for the one-shot path (streaming off)
        seen = 0
        stats = RolloutStats()
        while True:
            w0 = time.perf_counter()
            if w0 > deadline:
                raise TimeoutError(f"learner: step {step} still waiting for groups from the replay buffer "
                                   f"after {timeout_s:.0f}s ({seen} groups received)")
            got = ray.get(buffer.take.remote(timeout_s=min(2.0, max(deadline - w0, 0.01))),
                          timeout=max(deadline - w0, 0.01) + 30)
            waited += time.perf_counter() - w0
            if got["step"] != step:
                raise RuntimeError(f"learner: buffer is at step {got['step']}, learner at step {step}")
            c0 = time.perf_counter()
            for group in got["groups"]:
                seen += 1
                stats.add(group)
                trajs, rewards = self._group(group)
                if self.cfg.learner.streaming:
                    self.trainer.accumulate(trajs, rewards)
                else:
                    held.append((trajs, rewards))
            computed += time.perf_counter() - c0
            if got["done"]:
                break
        c0 = time.perf_counter()
        metrics = self.trainer.finish_step() if self.cfg.learner.streaming else self.trainer.train_step(held)
        computed += time.perf_counter() - c0
        metrics.update(stats.summary())
        metrics.update(groups_in=seen, learner_wait_s=waited, learner_compute_s=computed,
                       learner_s=time.perf_counter() - t0)
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

    def summary(self) -> dict:
        n = max(self.n, 1)
        return {"samples": self.n, "accuracy": self.correct / n, "reward": self.reward / n,
                "format_ok": self.format_ok / n, "parallel_trigger_rate": self.forked / n,
                "branches_per_fork": self.branches / max(self.forks, 1), "mean_tokens": self.tokens / n}
