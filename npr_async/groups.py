"""Per-step accounting of sample groups: the replay buffer's core, free of Ray and ZMQ so it tests plainly.

A step expects `samples_per_prompt` samples of each of its prompts, all sampled with the step's weight
version. `add` takes a verified sample exactly once: another version is refused (`stale_dropped`, which
stays 0 in on-policy mode), a second copy of (prompt_id, sample_idx) is refused (`duplicates`), a prompt
the step never asked for is refused (`unexpected`). A group is released to the learner as soon as it is
complete; DAPO's dynamic sampling drops groups whose rewards are all equal (no learning signal).
"""
from __future__ import annotations

from collections import deque

from npr_async.messages import VerifiedTrajectory


class StepGroups:
    def __init__(self, step: int, version: int, prompt_ids: list[str], samples_per_prompt: int,
                 dynamic_sampling: bool = False):
        if len(set(prompt_ids)) != len(prompt_ids):
            raise ValueError(f"step {step}: prompt ids are not unique")
        self.step, self.version, self.group_size = step, version, samples_per_prompt
        self.dynamic_sampling = dynamic_sampling
        self.partial: dict[str, dict[int, VerifiedTrajectory]] = {p: {} for p in prompt_ids}
        self.ready: deque[list[VerifiedTrajectory]] = deque()
        self.released = 0  # groups handed to the learner
        self.completed_ids: set[str] = set()
        self.counts = {"accepted": 0, "stale_dropped": 0, "duplicates": 0, "unexpected": 0,
                       "groups_complete": 0, "groups_filtered": 0}

    def add(self, item: VerifiedTrajectory) -> str:
        """Take one verified sample; returns what happened to it (a key of `counts`)."""
        traj = item.trajectory
        if traj.version != self.version:
            return self._count("stale_dropped")
        group = self.partial.get(traj.prompt_id)
        if group is None:  # unknown prompt, or its group is already complete (a late duplicate)
            done = traj.prompt_id in self.completed_ids
            return self._count("duplicates" if done else "unexpected")
        if not 0 <= traj.sample_idx < self.group_size:
            return self._count("unexpected")
        if traj.sample_idx in group:
            return self._count("duplicates")
        group[traj.sample_idx] = item
        self._count("accepted")
        if len(group) == self.group_size:
            del self.partial[traj.prompt_id]
            self.completed_ids.add(traj.prompt_id)
            samples = [group[i] for i in range(self.group_size)]
            self.counts["groups_complete"] += 1
            if self.dynamic_sampling and len({s.reward for s in samples}) == 1:
                self.counts["groups_filtered"] += 1
            else:
                self.ready.append(samples)
        return "accepted"

    def _count(self, key: str) -> str:
        self.counts[key] += 1
        return key

    def take(self, max_groups: int | None = None) -> list[list[VerifiedTrajectory]]:
        """Release complete groups (oldest first) to the learner."""
        out = []
        while self.ready and (max_groups is None or len(out) < max_groups):
            out.append(self.ready.popleft())
        self.released += len(out)
        return out

    def missing(self) -> dict[str, list[int]]:
        """Samples not yet received, per prompt: what a restarted rollout generator must redo."""
        return {p: [i for i in range(self.group_size) if i not in g] for p, g in self.partial.items()}

    @property
    def complete(self) -> bool:
        return not self.partial

    @property
    def expected_groups(self) -> int:
        """Groups the learner will receive this step (filtered ones excluded, as far as known)."""
        return self.counts["groups_complete"] - self.counts["groups_filtered"] + len(self.partial)

    @property
    def drained(self) -> bool:
        return self.complete and not self.ready
