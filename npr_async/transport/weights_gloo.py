"""Weight broadcast data plane on gloo (CPU runs, CI): its own `ProcessGroupGloo` on the control store,
so it never touches (or needs) the default `torch.distributed` process group of the learner.

Double-buffered like the NCCL plane: gloo runs a broadcast on its own threads, so the sender packs bucket
i+1 while bucket i is on the wire, and a receiver unpacks bucket i while bucket i+1 arrives. The same
interface as the NCCL plane: `stage` packs the first bucket while rank 0 waits for the acks, buckets whose
tensors already sit in their layout are sent from / received into them directly.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from npr_async.transport.buckets import Layout
from npr_async.transport.weights_plan import Staging, Step


class GlooPlane:
    def __init__(self, control, device: str | torch.device = "cpu"):
        self.rank = control.rank
        self.device = torch.device(device)
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("gloo", control.store), control.rank,
                                        control.world_size, timedelta(seconds=control.timeout_s))
        self.staging = Staging(self.device)
        self.last_timings: dict[str, float] = {}
        self._steps: list[Step] = []
        self._packed = -1  # the step `stage` packed already
        self._works: list = []

    def _bcast(self, buf: torch.Tensor):
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self.pg.broadcast([buf], opts)

    # -- sender ------------------------------------------------------------------------------------------
    def stage(self, layout: Layout, key: str, params) -> int:
        """Before the acks are in: pack the first staged bucket. Returns how many buckets need no packing."""
        self._steps = self.staging.steps(layout, key, params)
        self._packed = next((i for i, s in enumerate(self._steps) if s.direct is None), -1)
        if self._packed >= 0:
            self._steps[self._packed].pack()
        return sum(s.direct is not None for s in self._steps)

    def send(self) -> None:
        """Start every bucket's broadcast; `finish` waits for the last ones."""
        works = [None, None]  # per staging buffer: the broadcast still reading it
        self._works = []
        for i, step in enumerate(self._steps):
            if step.direct is not None:
                self._works.append(self._bcast(step.direct))
                continue
            if works[step.slot] is not None:
                works[step.slot].wait()  # buffer free again once the bucket before is out
            if i != self._packed:
                step.pack()  # overlaps the previous bucket's broadcast
            works[step.slot] = self._bcast(self.staging.buffer(step))
            self._works.append(works[step.slot])

    def finish(self) -> None:
        for w in self._works:
            w.wait()
        self._steps, self._works = [], []

    def unstage(self) -> None:
        self._steps = []

    # -- receiver ----------------------------------------------------------------------------------------
    def prepare_recv(self, layout: Layout, key: str, into) -> None:
        self._steps = self.staging.steps(layout, key, into)

    def recv(self) -> int:
        """Returns how many buckets landed directly in the parameters (no copy-out)."""
        steps, self._steps = self._steps, []
        pending, works = None, []
        for step in steps:
            buf = step.direct if step.direct is not None else self.staging.buffer(step)
            work = self._bcast(buf)
            works.append(work)
            if pending is not None:
                self._finish(*pending)  # unpack bucket i-1 while bucket i arrives
            pending = (step, work)
        if pending is not None:
            self._finish(*pending)
        for w in works:
            w.wait()
        return sum(s.direct is not None for s in steps)

    @staticmethod
    def _finish(step: Step, work) -> None:
        work.wait()
        if step.direct is None:
            step.unpack()

    def close(self) -> None:
        self.pg = None
