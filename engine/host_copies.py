"""Host <-> device copies of the engine loop that never wait for the GPU.

A copy between pageable host memory and the GPU may synchronise with the stream (the driver stages it through
pinned memory; CUDA's "API synchronization behavior"), and `.tolist()` of a device tensor waits for everything
queued on the stream, a step launched ahead of the host (engine/step_ahead.py) included: either puts the host's
work for the next step behind the GPU's for this one, and the GPU idles while the host catches up. These go
through torch's caching pinned allocator instead, whose blocks are reused only once the copy that used them has
run (torch records an event on the stream for each asynchronous copy).
"""
from __future__ import annotations

import numpy as np
import torch


def pinned(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`array` (numpy or a CPU tensor) as a CPU tensor to copy to `device` with non_blocking=True: in pinned
    memory for a GPU."""
    t = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


def upload(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`array` on `device`, copied asynchronously (from pinned memory on a GPU)."""
    return pinned(array, device).to(device, non_blocking=True)


class Readback:
    """A device tensor's values on their way to the host, started now: `tolist()` waits for this copy only, not
    for the work queued on the stream after it."""

    def __init__(self, t: torch.Tensor):
        self.done = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = t

    def tolist(self) -> list:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()
