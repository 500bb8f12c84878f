"""Weight sync, learner → rollout generators: one interface, two data planes (`nccl`, `gloo`).

    tx = WeightSender("nccl", world_size=1 + n_rollout, device="cuda:0")      # rank 0, the learner
    addr = tx.address                 # "host:port", handed to the generators by the controller
    rx = WeightReceiver("nccl", rank=i + 1, world_size=1 + n_rollout, store_addr=addr, device="cuda:0")
    tx.send(model.named_parameters(), version=k)   |   version = rx.recv(into=model)

Construction never blocks (rank 0 binds its control store, so `address` is known at once); `connect()`
is collective (every rank, like `init_process_group`; the first `send`/`recv` calls it), and so is each
`send`/`recv` pair. Before any collective the ranks meet on the control store with deadlines (control.py),
so a missing rank is a `WeightSyncTimeout` naming it, and a layout that does not match a receiver's model
is a `WeightMismatch` on every rank instead of a hang or silently wrong weights.
"""
from __future__ import annotations

import time

import torch

from npr_async.transport import buckets
from npr_async.transport.control import Control, WeightMismatch, WeightSyncError, role

BACKENDS = ("gloo", "nccl")


def _plane(backend: str, control: Control, device, unique_id: bytes | None):
    if backend == "gloo":
        from npr_async.transport.weights_gloo import GlooPlane
        return GlooPlane(control, device if device is not None else "cpu")
    if backend == "nccl":
        from npr_async.transport.weights_nccl import NcclPlane
        return NcclPlane(control, device, unique_id)
    raise ValueError(f"unknown weight-sync backend {backend!r} (expected one of {BACKENDS})")


class _Endpoint:
    def __init__(self, backend, rank, world_size, store_addr, timeout_s, device, unique_id):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.backend, self.rank, self.world_size = backend, rank, world_size
        self.control = Control(rank, world_size, store_addr, timeout_s)
        self.address = self.control.address
        self._device, self._unique_id = device, unique_id
        self.plane = None
        self.connected = False
        self.round = 0
        self.version: int | None = None
        self.last_seconds = 0.0

    def connect(self) -> None:
        """Collective: every rank meets on the store (a missing one is named after `timeout_s`), then the
        data plane is built. `send`/`recv` call it on first use; call it early to fail early."""
        if self.connected:
            return
        self.control.join()
        if self.world_size > 1:
            self.plane = _plane(self.backend, self.control, self._device, self._unique_id)
        self.connected = True

    def close(self) -> None:
        if self.plane is not None:
            self.plane.close()
            self.plane = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class WeightSender(_Endpoint):
    """Rank 0. `store_addr`: "host:port" to bind the control store on (default: any interface, free port)."""

    def __init__(self, backend: str = "gloo", *, world_size: int, store_addr: str | None = None,
                 timeout_s: float = 300.0, bucket_mb: float = 256.0, device=None, unique_id: bytes | None = None):
        self.bucket_bytes = int(bucket_mb * 2**20)
        super().__init__(backend, 0, world_size, store_addr, timeout_s, device, unique_id)
        self.layout: buckets.Layout | None = None

    def send(self, named_tensors, version: int) -> buckets.Layout:
        """Broadcast `named_tensors` (module, mapping or (name, tensor) pairs) as weight `version`."""
        self.connect()
        t0 = time.perf_counter()
        params = buckets.named_tensors(named_tensors)
        r = self.round
        layout = buckets.plan(params, self.bucket_bytes, version=version, round=r)
        self.round = r + 1  # a failed round is still a round: every rank moves past it
        self.control.publish(r, layout.to_json())
        self.control.collect_acks(r)
        if self.plane is not None:
            with torch.no_grad():
                self.plane.send(layout, params)
        self.version, self.layout = version, layout
        self.last_seconds = time.perf_counter() - t0
        return layout


class WeightReceiver(_Endpoint):
    """Rank 1.. (one per rollout generator)."""

    def __init__(self, backend: str = "gloo", *, rank: int, world_size: int, store_addr: str,
                 timeout_s: float = 300.0, device=None, unique_id: bytes | None = None):
        if rank == 0:
            raise ValueError("rank 0 is the sender (WeightSender)")
        super().__init__(backend, rank, world_size, store_addr, timeout_s, device, unique_id)
        self.layout: buckets.Layout | None = None
        self.direct_buckets = 0  # buckets of the last recv that landed in the parameters with no copy

    def recv(self, into, timeout_s: float | None = None, expect_version: int | None = None) -> int:
        """Receive the next weights into `into` (module or name → tensor mapping, updated in place) and
        return their version. `timeout_s` bounds the wait for rank 0 to start sending."""
        self.connect()
        params = buckets.named_tensors(into)
        r = self.round
        meta = self.control.fetch_meta(r, timeout_s)
        t0 = time.perf_counter()
        layout = buckets.Layout.from_json(meta)
        problems = buckets.mismatches(layout, params)
        if expect_version is not None and layout.version != expect_version:
            problems.insert(0, f"version {layout.version} sent, expected {expect_version}")
        self.control.ack(r, "; ".join(problems))
        if problems:
            self.round = r + 1  # rank 0 aborts this round; stay in step with it
            raise WeightMismatch(f"{role(self.rank)}: weights v{layout.version} from rank 0 do not match: "
                                 + "; ".join(problems))
        try:
            self.control.await_go(r)
        except WeightSyncError:
            self.round = r + 1
            raise
        with torch.no_grad():
            self.direct_buckets = self.plane.recv(layout, params)
        self.round, self.version, self.layout = r + 1, layout.version, layout
        self.last_seconds = time.perf_counter() - t0
        return layout.version

    recv_into = recv  # the name in docs/contracts.md

    def adopt_layout(self, into) -> None:
        """Re-home `into`'s tensors into flat bucket storages matching the last received layout, so that
        later receives land in them directly (call between steps, before CUDA-graph capture)."""
        if self.layout is None:
            raise WeightSyncError(f"{role(self.rank)}: adopt_layout needs one recv first")
        buckets.adopt(self.layout, buckets.named_tensors(into))

