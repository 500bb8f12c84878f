"""Weight broadcast data plane on NCCL through CuPy (`cupy.cuda.nccl`), learner rank 0 + every rollout
generator in one communicator. Imports cupy lazily: this module loads on CPU-only machines too.

Sender: two uint8 staging buffers; bucket i+1 is packed on a side stream while bucket i is broadcast on
the comm stream (events order: packed(i) → bcast(i) → buffer free → pack(i+2)). Receiver: broadcast
straight into the parameters when their storage has the bucket's layout (`buckets.adopt`), otherwise into
a staging buffer that a side stream copies out while the next bucket arrives.
"""
from __future__ import annotations

import torch

from npr_async.transport.buckets import Layout, direct_view, pack, unpack

_CHUNK = 1 << 30  # cupy's bcast takes an int count: broadcast larger buckets in 1 GiB pieces


def uid_to_bytes(uid) -> bytes:
    return uid if isinstance(uid, bytes) else bytes(x % 256 for x in uid)


def uid_from_bytes(data: bytes) -> tuple:
    return tuple(b - 256 if b > 127 else b for b in data)  # ncclUniqueId is char[128] (signed)


def new_unique_id() -> bytes:
    from cupy.cuda import nccl
    return uid_to_bytes(nccl.get_unique_id())


class NcclPlane:
    def __init__(self, control, device, unique_id: bytes | None = None):
        import cupy
        from cupy.cuda import nccl
        self._nccl = nccl
        self.rank = control.rank
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        if control.rank == 0:  # rank 0 makes the id unless the controller handed one out
            uid = unique_id or new_unique_id()
            control.store.set("nccl/uid", uid)
        else:
            if unique_id is None:
                control.wait({0: "nccl/uid"}, "rank 0's NCCL unique id")
                unique_id = control.store.get("nccl/uid")
            uid = unique_id
        with cupy.cuda.Device(self.device.index):
            # every rank has joined (Control.join), so this collective init cannot hang on a missing rank
            try:  # newer CuPy takes the id as bytes, older as a tuple of signed chars
                self.comm = nccl.NcclCommunicator(control.world_size, bytes(uid), control.rank)
            except TypeError:
                self.comm = nccl.NcclCommunicator(control.world_size, uid_from_bytes(uid), control.rank)
        self.comm_stream = torch.cuda.Stream(self.device)
        self.side_stream = torch.cuda.Stream(self.device)  # packing (sender) / copy-out (receiver)
        self._bufs: list[torch.Tensor] = []

    def _buffers(self, nbytes: int) -> list[torch.Tensor]:
        if not self._bufs or self._bufs[0].numel() < nbytes:
            self._bufs = []  # free the old pair before allocating the new one
            self._bufs = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        return self._bufs

    def bcast(self, buf: torch.Tensor, stream: torch.cuda.Stream) -> None:
        ptr, n = buf.data_ptr(), buf.numel()
        for off in range(0, n, _CHUNK):
            self.comm.bcast(ptr + off, min(_CHUNK, n - off), self._nccl.NCCL_UINT8, 0, stream.cuda_stream)

    def send(self, layout: Layout, params) -> None:
        bufs = self._buffers(layout.max_bucket_nbytes)
        cur = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(cur)  # the parameters were written on the caller's stream
        free: list[torch.cuda.Event | None] = [None, None]
        for i, b in enumerate(layout.buckets):
            j = i % 2
            with torch.cuda.stream(self.side_stream):
                if free[j] is not None:
                    self.side_stream.wait_event(free[j])  # bucket i-2's broadcast has left buffer j
                pack(b, params, bufs[j][:b.nbytes])
                packed = torch.cuda.Event()
                packed.record(self.side_stream)
            self.comm_stream.wait_event(packed)
            self.bcast(bufs[j][:b.nbytes], self.comm_stream)
            free[j] = torch.cuda.Event()
            free[j].record(self.comm_stream)
        self.comm_stream.synchronize()
        self.side_stream.synchronize()

    def recv(self, layout: Layout, into) -> int:
        bufs = self._buffers(layout.max_bucket_nbytes)
        cur = torch.cuda.current_stream(self.device)
        self.comm_stream.wait_stream(cur)  # nothing may still read the parameters we overwrite
        self.side_stream.wait_stream(cur)
        free: list[torch.cuda.Event | None] = [None, None]
        direct = 0
        for i, b in enumerate(layout.buckets):
            target = direct_view(b, into)
            if target is not None:
                self.bcast(target, self.comm_stream)
                direct += 1
                continue
            j = i % 2
            if free[j] is not None:
                self.comm_stream.wait_event(free[j])  # bucket i-2 has been copied out of buffer j
            buf = bufs[j][:b.nbytes]
            self.bcast(buf, self.comm_stream)
            arrived = torch.cuda.Event()
            arrived.record(self.comm_stream)
            with torch.cuda.stream(self.side_stream):
                self.side_stream.wait_event(arrived)
                unpack(b, buf, into)  # overlaps the next bucket's broadcast
                free[j] = torch.cuda.Event()
                free[j].record(self.side_stream)
        self.comm_stream.synchronize()
        self.side_stream.synchronize()
        return direct

    def close(self) -> None:
        if getattr(self, "comm", None) is not None:
            self.comm.destroy()
            self.comm = None
