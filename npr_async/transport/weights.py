"""Weight sync, learner → rollout generators: one interface, two data planes (`nccl`, `gloo`).

    tx = WeightSender("nccl", world_size=1 + n_rollout, device="cuda:0")      # rank 0, the learner
    addr = tx.address                 # "host:port", handed to the generators by the controller
    rx = WeightReceiver("nccl", rank=i + 1, world_size=1 + n_rollout, store_addr=addr, device="cuda:0")
    tx.send(model.named_parameters(), version=k, dtype=torch.bfloat16)   |   version = rx.recv(into=model)

Construction never blocks (rank 0 binds its control store, so `address` is known at once); `connect()`
is collective (every rank, like `init_process_group`; the first `send`/`recv` calls it), and so is each
`send`/`recv` pair. Before any collective the ranks meet on the control store with deadlines (control.py),
so a missing rank is a `WeightSyncTimeout` naming it, and a layout that does not match a receiver's model
is a `WeightMismatch` on every rank instead of a hang or silently wrong weights.

Per-round fixed cost is kept off the broadcast: the sender plans and serialises a layout only when the
tensors' names/shapes/dtypes change (a receiver validates each layout once against its model), and starts
packing the first buckets while the acks are still on their way.
"""
from __future__ import annotations

import dataclasses
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
        self.layout: buckets.Layout | None = None
        self.last_seconds = 0.0
        self.last_timings: dict[str, float] = {}  # ms, of the last round: handshake (wait, check), the
        # plane's first_pack (sender) and broadcast (GPU time, nccl), total

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

    def adopt_layout(self, tensors) -> None:
        """Re-home `tensors` into flat bucket storages matching the last layout sent or received (same
        Python objects, new storage; call between steps, before CUDA-graph capture). A receiver then
        receives straight into them; a sender that sends these same tensors broadcasts them with no pack."""
        if self.layout is None:
            raise WeightSyncError(f"{role(self.rank)}: adopt_layout needs one send/recv first")
        buckets.adopt(self.layout, buckets.named_tensors(tensors))


class WeightSender(_Endpoint):
    """Rank 0. `store_addr`: "host:port" to bind the control store on (default: any interface, free port)."""

    def __init__(self, backend: str = "gloo", *, world_size: int, store_addr: str | None = None,
                 timeout_s: float = 300.0, bucket_mb: float = 256.0, device=None, unique_id: bytes | None = None):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.bucket_bytes = int(bucket_mb * 2**20)
        super().__init__(backend, 0, world_size, store_addr, timeout_s, device, unique_id)
        self._planned: tuple | None = None  # ((signature, bucket_bytes), layout, key, json) of the last layout
        self.direct_buckets = 0  # buckets of the last send broadcast from the tensors themselves (no pack)

    def _layout_for(self, params, dtype) -> tuple[buckets.Layout, str, bytes]:
        """The layout of the last round when names, shapes and dtypes are unchanged (plan + JSON: ~1 ms)."""
        sig = (buckets.signature(params, dtype), self.bucket_bytes)
        if self._planned is None or self._planned[0] != sig:
            layout = buckets.plan(params, self.bucket_bytes, dtype=dtype)
            self._planned = (sig, layout, layout.key(), layout.to_json())
        return self._planned[1:]

    def send(self, named_tensors, version: int, dtype: torch.dtype | None = None) -> buckets.Layout:
        """Broadcast `named_tensors` (module, mapping or (name, tensor) pairs) as weight `version`.
        `dtype`: send floating-point tensors as this dtype, cast while packing (the learner's fp32 masters
        → the generators' bf16, with no cast copy of the model). The tensors are read until this returns."""
        self.connect()
        t0 = time.perf_counter()
        params = buckets.named_tensors(named_tensors)
        layout, key, layout_json = self._layout_for(params, dtype)
        self.control.post_layout(key, layout_json)
        with torch.no_grad():
            if self.plane is not None:
                self.direct_buckets = self.plane.stage(layout, key, params)  # first pack ‖ handshake
            try:
                r = self._handshake(version, key)
            except WeightSyncError:
                if self.plane is not None:
                    self.plane.unstage()
                raise
            t_go = time.perf_counter()
            if self.plane is not None:
                self.plane.send()
            try:
                self.control.forget(r, key)  # store clean-up while the broadcast runs
            finally:
                if self.plane is not None:
                    self.plane.finish()
        self.version, self.layout = version, dataclasses.replace(layout, version=version, round=r)
        self.last_seconds = time.perf_counter() - t0
        self.last_timings = {"handshake_ms": (t_go - t0) * 1e3, "total_ms": self.last_seconds * 1e3,
                             **(self.plane.last_timings if self.plane is not None else {})}
        return self.layout

    def _handshake(self, version: int, key: str) -> int:
        """Agree on a round with every receiver (control.py); returns it, or raises with the round aborted."""
        while True:
            r = self.round
            self.round = r + 1  # a failed round is still a round: every rank moves past it
            notes = self.control.collect_ready(r)
            wrong = [f"{role(i)}: version {version} sent, expected {n['expect']}"
                     for i, n in enumerate(notes, 1) if n["expect"] is not None and n["expect"] != version]
            unchecked = any(n["layout"] != key for n in notes)
            do = "abort" if wrong else "check" if unchecked else "go"
            error = "weights do not match the receivers' models: " + " | ".join(wrong) if wrong else ""
            if self.control.decide(r, {"do": do, "version": version, "layout": key, "error": error}) is not None:
                continue  # a receiver withdrew from round r (gave up waiting): all move on to r+1
            if wrong:
                raise WeightMismatch(f"{role(0)}: {error}")
            if unchecked:
                self.control.collect_acks(r)
            return r


class WeightReceiver(_Endpoint):
    """Rank 1.. (one per rollout generator)."""

    def __init__(self, backend: str = "gloo", *, rank: int, world_size: int, store_addr: str,
                 timeout_s: float = 300.0, device=None, unique_id: bytes | None = None):
        if rank == 0:
            raise ValueError("rank 0 is the sender (WeightSender)")
        super().__init__(backend, rank, world_size, store_addr, timeout_s, device, unique_id)
        self.direct_buckets = 0  # buckets of the last recv that landed in the parameters with no copy
        self._validated: tuple | None = None  # (layout key, signature of `into`, layout) last found matching

    def recv(self, into, timeout_s: float | None = None, expect_version: int | None = None) -> int:
        """Receive the next weights into `into` (module or name → tensor mapping, updated in place) and
        return their version. `timeout_s` bounds the wait for rank 0 to start sending."""
        self.connect()
        params = buckets.named_tensors(into)
        sig = buckets.signature(params)
        t_enter, first = time.perf_counter(), self.round
        budget = self.control.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        while True:
            r = self.round
            known = self._validated if self._validated is not None and self._validated[1] == sig else None
            self.control.ready(r, known[0] if known else "", expect_version)
            with torch.no_grad():
                if known:  # the steady state: work out the targets while rank 0 decides
                    self.plane.prepare_recv(known[2], known[0], params)
                try:
                    left = budget if r == first else max(deadline - time.monotonic(), 0.0)
                    verdict = self.control.await_verdict(r, left)
                except WeightSyncError:
                    self.round = r + 1  # withdrawn: every rank moves past round r
                    raise
            t0 = time.perf_counter()
            self.round = r + 1
            if verdict["do"] != "withdrawn":
                break
        if verdict["do"] == "abort":
            sent = verdict.get("version")
            if expect_version is not None and sent not in (None, expect_version):
                raise WeightMismatch(f"{role(self.rank)}: weights v{sent} from rank 0 do not match: "
                                     f"version {sent} sent, expected {expect_version}")
            raise WeightSyncError(f"{role(self.rank)}: round {r} aborted by rank 0: {verdict['error']}")
        version, key = verdict["version"], verdict["layout"]
        if verdict["do"] == "check":
            layout = self._check_layout(r, version, key, params, sig)
        elif known is not None and known[0] == key:
            layout = known[2]
        else:  # rank 0 says go only when every receiver holds its layout
            raise WeightSyncError(f"{role(self.rank)}: round {r}: rank 0 said go with layout {key}, this rank "
                                  f"holds {known[0] if known else 'none'}")
        t_go = time.perf_counter()
        with torch.no_grad():
            if verdict["do"] == "check":
                self.plane.prepare_recv(layout, key, params)
            self.direct_buckets = self.plane.recv()
        self.version, self.layout = version, dataclasses.replace(layout, version=version, round=r)
        self.last_seconds = time.perf_counter() - t0
        self.last_timings = {"wait_ms": (t0 - t_enter) * 1e3, "check_ms": (t_go - t0) * 1e3,
                             "total_ms": self.last_seconds * 1e3, **self.plane.last_timings}
        return version

    def _check_layout(self, r: int, version: int, key: str, params, sig) -> buckets.Layout:
        """Rank 0 asked every receiver to check layout `key`: ack, then wait for rank 0's go."""
        if self._validated is not None and self._validated[:2] == (key, sig):
            layout, problems = self._validated[2], []
        else:
            try:
                layout = buckets.Layout.from_json(self.control.fetch_layout(key))
                problems = buckets.mismatches(layout, params)
            except (WeightSyncError, ValueError, KeyError) as e:
                layout, problems = None, [f"cannot read layout {key}: {e}"]
        self.control.ack(r, "; ".join(problems))
        if problems:
            raise WeightMismatch(f"{role(self.rank)}: weights v{version} from rank 0 do not match: "
                                 + "; ".join(problems))
        self._validated = (key, sig, layout)
        self.control.await_go2(r)
        return layout

    recv_into = recv  # the name in docs/contracts.md
