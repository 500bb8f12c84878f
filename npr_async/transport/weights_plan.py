"""What one send or receive does with each bucket, worked out before the broadcast starts (both planes).

A bucket is either *direct* (the tensors already sit in the bucket's layout: the broadcast reads or writes
their own bytes) or goes through one of two staging buffers (pack before sending, unpack after receiving),
alternating so that one buffer is on the wire while the other is packed or unpacked. The views into the
staging buffers are cached per layout: building ~400 of them costs ~1.4 ms, every round otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from npr_async.transport.buckets import Bucket, Layout, direct_view


@dataclass
class Step:
    bucket: Bucket
    direct: torch.Tensor | None  # uint8 view over the tensors' own bytes: no copy
    slot: int = -1  # staging buffer (0 or 1) when not direct
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (staging view, tensor)

    def pack(self) -> None:
        for view, t in self.pairs:
            view.copy_(t)  # casts when the tensor's dtype is not the layout's (fp32 masters → bf16)

    def unpack(self) -> None:
        for view, t in self.pairs:
            t.copy_(view)


class Staging:
    """Two uint8 staging buffers on `device`, allocated on first need, and the views into them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: list[torch.Tensor] = []
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}  # (bucket index, slot) → views
        self._views_key = ""  # the layout the cached views belong to

    def steps(self, layout: Layout, key: str, tensors) -> list[Step]:
        """One Step per bucket, for these tensors (checked every round: their storage may have moved)."""
        steps = [Step(b, direct_view(b, tensors)) for b in layout.buckets]
        staged = [s for s in steps if s.direct is None]
        if not staged:
            return steps
        self._ensure(max(s.bucket.nbytes for s in staged))
        if key != self._views_key:
            self._views, self._views_key = {}, key
        for k, s in enumerate(staged):
            s.slot = k % 2
            views = self._views.get((s.bucket.index, s.slot))
            if views is None:
                views = [v for _, v in s.bucket.views(self.buffer(s))]
                self._views[(s.bucket.index, s.slot)] = views
            s.pairs = list(zip(views, [tensors[n] for n in s.bucket.names]))
        return steps

    def buffer(self, step: Step) -> torch.Tensor:
        return self.buffers[step.slot][:step.bucket.nbytes]

    def _ensure(self, nbytes: int) -> None:
        if not self.buffers or self.buffers[0].numel() < nbytes:
            self.buffers, self._views, self._views_key = [], {}, ""  # free the old pair before the new one
            self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
