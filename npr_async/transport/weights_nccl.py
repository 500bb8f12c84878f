"""Weight broadcast data plane on NCCL through CuPy (`cupy.cuda.nccl`), learner rank 0 + every rollout
generator in one communicator. Imports cupy lazily: this module loads on CPU-only machines too.

Sender: `stage` (before the receivers' acks are in) starts packing the first bucket on a side stream, so
the handshake hides the first pack; `send` then broadcasts on the comm stream while the side stream packs
bucket i+1 into the other staging buffer (events: packed(i) → bcast(i) → buffer free → pack(i+2)). A bucket
whose tensors already sit in its layout (a lone tensor, an adopted storage) is broadcast from them: no pack.
Receiver: broadcast straight into the parameters when their storage has the bucket's layout (`adopt`),
otherwise into a staging buffer that a side stream copies out while the next bucket arrives.
"""
from __future__ import annotations

import torch

from npr_async.transport.buckets import Layout
from npr_async.transport.weights_plan import Staging, Step

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
            uid = unique_id or control.get({0: "nccl/uid"}, "rank 0's NCCL unique id")[0]
        with cupy.cuda.Device(self.device.index):
            # every rank has joined (Control.join), so this collective init cannot hang on a missing rank
            try:  # newer CuPy takes the id as bytes, older as a tuple of signed chars
                self.comm = nccl.NcclCommunicator(control.world_size, bytes(uid), control.rank)
            except TypeError:
                self.comm = nccl.NcclCommunicator(control.world_size, uid_from_bytes(uid), control.rank)
        self.comm_stream = torch.cuda.Stream(self.device)
        self.side_stream = torch.cuda.Stream(self.device)  # packing (sender) / copy-out (receiver)
        self.staging = Staging(self.device)
        self.last_timings: dict[str, float] = {}
        self._job: _Job | None = None

    def bcast(self, buf: torch.Tensor, stream: torch.cuda.Stream) -> None:
        ptr, n = buf.data_ptr(), buf.numel()
        for off in range(0, n, _CHUNK):
            self.comm.bcast(ptr + off, min(_CHUNK, n - off), self._nccl.NCCL_UINT8, 0, stream.cuda_stream)

    # -- sender ------------------------------------------------------------------------------------------
    def stage(self, layout: Layout, key: str, params) -> int:
        """Enqueue what needs no receiver yet: packing the first staged bucket (the rest is packed while
        the bucket before it is on the wire). Returns how many buckets need no packing."""
        job = self._job = _Job(self.staging.steps(layout, key, params))
        cur = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(cur)  # the parameters were written on the caller's stream
        self.comm_stream.wait_stream(cur)  # direct buckets are broadcast from the parameters themselves
        job.t_stage.record(self.side_stream)
        first = next((i for i, s in enumerate(job.steps) if s.direct is None), None)
        if first is not None:
            self._pack(job, first)
        return sum(s.direct is not None for s in job.steps)

    def _pack(self, job: "_Job", i: int) -> None:
        step = job.steps[i]
        with torch.cuda.stream(self.side_stream):
            if job.free[step.slot] is not None:
                self.side_stream.wait_event(job.free[step.slot])  # the bucket before has left this buffer
            step.pack()
            job.packed[i] = torch.cuda.Event(enable_timing=job.t_first_packed is None)
            job.packed[i].record(self.side_stream)
            if job.t_first_packed is None:
                job.t_first_packed = job.packed[i]

    def send(self) -> None:
        """Enqueue every bucket's broadcast (after the go): returns before the GPU is done, see `finish`."""
        job = self._job
        job.t_bcast.record(self.comm_stream)
        for i, step in enumerate(job.steps):
            if step.direct is not None:
                self.bcast(step.direct, self.comm_stream)
                continue
            if job.packed[i] is None:
                self._pack(job, i)  # overlaps bucket i-1's broadcast
            self.comm_stream.wait_event(job.packed[i])
            self.bcast(self.staging.buffer(step), self.comm_stream)
            job.free[step.slot] = torch.cuda.Event()
            job.free[step.slot].record(self.comm_stream)
        job.t_end.record(self.comm_stream)

    def finish(self) -> None:
        job, self._job = self._job, None
        self.comm_stream.synchronize()
        self.side_stream.synchronize()
        if job is not None:
            first = job.t_stage.elapsed_time(job.t_first_packed) if job.t_first_packed is not None else 0.0
            self.last_timings = {"first_pack_ms": first, "broadcast_ms": job.t_bcast.elapsed_time(job.t_end)}

    def unstage(self) -> None:
        """The round was aborted: nothing is broadcast; let the staged packs finish."""
        self._job = None
        self.side_stream.synchronize()

    # -- receiver ----------------------------------------------------------------------------------------
    def prepare_recv(self, layout: Layout, key: str, into) -> None:
        """Work out each bucket's target while rank 0 collects the acks (no GPU work)."""
        self._job = _Job(self.staging.steps(layout, key, into))

    def recv(self) -> int:
        job, self._job = self._job, None
        cur = torch.cuda.current_stream(self.device)
        self.comm_stream.wait_stream(cur)  # nothing may still read the parameters we overwrite
        self.side_stream.wait_stream(cur)
        job.t_bcast.record(self.comm_stream)
        direct = 0
        for step in job.steps:
            if step.direct is not None:
                self.bcast(step.direct, self.comm_stream)
                direct += 1
                continue
            if job.free[step.slot] is not None:
                self.comm_stream.wait_event(job.free[step.slot])  # the bucket before is out of this buffer
            self.bcast(self.staging.buffer(step), self.comm_stream)
            arrived = torch.cuda.Event()
            arrived.record(self.comm_stream)
            with torch.cuda.stream(self.side_stream):
                self.side_stream.wait_event(arrived)
                step.unpack()  # overlaps the next bucket's broadcast
                job.free[step.slot] = torch.cuda.Event()
                job.free[step.slot].record(self.side_stream)
        self.side_stream.wait_stream(self.comm_stream)
        job.t_end.record(self.side_stream)  # after the last broadcast and the last copy-out
        self.comm_stream.synchronize()
        self.side_stream.synchronize()
        self.last_timings = {"broadcast_ms": job.t_bcast.elapsed_time(job.t_end)}
        return direct

    def close(self) -> None:
        if getattr(self, "comm", None) is not None:
            self.comm.destroy()
            self.comm = None


class _Job:
    """One send or receive in flight: its steps and the events that order the two streams."""

    def __init__(self, steps: list[Step]):
        self.steps = steps
        self.packed: list[torch.cuda.Event | None] = [None] * len(steps)
        self.free: list[torch.cuda.Event | None] = [None, None]  # per staging buffer: its bucket is done
        self.t_stage, self.t_bcast, self.t_end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        self.t_first_packed: torch.cuda.Event | None = None
