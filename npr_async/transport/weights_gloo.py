"""Weight broadcast data plane on gloo (CPU runs, CI): its own `ProcessGroupGloo` on the control store,
so it never touches (or needs) the default `torch.distributed` process group of the learner.

Double-buffered like the NCCL plane: gloo runs a broadcast on its own threads, so the sender packs bucket
i+1 while bucket i is on the wire, and a receiver unpacks bucket i while bucket i+1 arrives.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from npr_async.transport.buckets import Layout, direct_view, pack, unpack


class GlooPlane:
    def __init__(self, control, device: str | torch.device = "cpu"):
        self.rank = control.rank
        self.device = torch.device(device)
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("gloo", control.store), control.rank,
                                        control.world_size, timedelta(seconds=control.timeout_s))
        self._bufs: list[torch.Tensor] = []

    def _buffers(self, nbytes: int) -> list[torch.Tensor]:
        if not self._bufs or self._bufs[0].numel() < nbytes:
            self._bufs = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        return self._bufs

    def _bcast(self, buf: torch.Tensor):
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self.pg.broadcast([buf], opts)

    def send(self, layout: Layout, params) -> None:
        bufs = self._buffers(layout.max_bucket_nbytes)
        works = [None, None]
        for i, b in enumerate(layout.buckets):
            j = i % 2
            if works[j] is not None:
                works[j].wait()  # buffer j is free again once bucket i-2 is out
            buf = bufs[j][:b.nbytes]
            pack(b, params, buf)  # overlaps bucket i-1's broadcast
            works[j] = self._bcast(buf)
        for w in works:
            if w is not None:
                w.wait()

    def recv(self, layout: Layout, into) -> int:
        """Returns how many buckets landed directly in the parameters (no copy-out)."""
        bufs = self._buffers(layout.max_bucket_nbytes)
        pending, direct = None, 0
        for i, b in enumerate(layout.buckets):
            target = direct_view(b, into)
            buf = target if target is not None else bufs[i % 2][:b.nbytes]
            work = self._bcast(buf)
            if pending is not None:
                self._finish(*pending, into)  # unpack bucket i-1 while bucket i arrives
            pending = (b, buf, work, target is not None)
            direct += target is not None
        if pending is not None:
            self._finish(*pending, into)
        return direct

    @staticmethod
    def _finish(bucket, buf, work, is_direct, into) -> None:
        work.wait()
        if not is_direct:
            unpack(bucket, buf, into)

    def close(self) -> None:
        self.pg = None
