"""The weight-sync control plane: a torch TCPStore hosted by rank 0 (the learner).

NCCL has no timeouts of its own, so every wait happens here, before a collective, with a deadline; a
timeout names the ranks that never arrived. Per round r (one `send`/`recv` pair):
  rank 0 publishes `r{r}/meta` (the bucket layout, JSON) → each rank checks it against its model and posts
  `r{r}/ack/{rank}` ("ok" or the mismatch) → rank 0 posts `r{r}/go` ("go" or "abort: …") → broadcast.
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from npr_async.transport.endpoints import host_ip


class WeightSyncError(RuntimeError):
    pass


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    pass


class WeightMismatch(WeightSyncError, ValueError):
    pass


def role(rank: int) -> str:
    return "rank 0 (learner)" if rank == 0 else f"rank {rank} (rollout generator {rank - 1})"


class Control:
    def __init__(self, rank: int, world_size: int, store_addr: str | None, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        td = timedelta(seconds=timeout_s)
        if rank == 0:
            host, port = (store_addr or "0.0.0.0:0").rsplit(":", 1)
            self.store = dist.TCPStore(host, int(port), is_master=True, wait_for_workers=False, timeout=td)
            self.address = f"{host_ip() if host in ('0.0.0.0', '') else host}:{self.store.port}"
        else:
            if not store_addr:
                raise ValueError(f"{role(rank)} needs store_addr (the sender's `address`)")
            host, port = store_addr.rsplit(":", 1)
            try:
                self.store = dist.TCPStore(host, int(port), is_master=False, timeout=td)
            except Exception as e:  # DistNetworkError / RuntimeError, depending on the torch version
                raise WeightSyncTimeout(f"{role(rank)}: cannot reach rank 0 (learner)'s store at {store_addr} "
                                        f"within {timeout_s}s: {e}") from None
            self.address = store_addr

    def wait(self, keys: dict[int, str], what: str, timeout_s: float | None = None) -> None:
        """Wait for `keys` (rank → key); on timeout name the ranks whose key never appeared."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not keys:
            return
        try:
            self.store.wait(list(keys.values()), timedelta(seconds=timeout_s))
        except Exception:
            missing = [r for r, k in keys.items() if not self.store.check([k])]
            if not missing:  # arrived just as the wait gave up
                return
            names = ", ".join(role(r) for r in missing)
            raise WeightSyncTimeout(f"{role(self.rank)}: timed out after {timeout_s}s waiting for {what}: "
                                    f"{names} never arrived") from None

    def join(self) -> None:
        """Everyone posts `join/{rank}`; rank 0 waits for all, then posts `joined`."""
        self.store.set(f"join/{self.rank}", b"1")
        if self.rank == 0:
            self.wait({r: f"join/{r}" for r in range(1, self.world_size)}, "ranks to join the weight sync")
            self.store.set("joined", b"1")
        else:
            try:
                self.wait({0: "joined"}, "rank 0 to see every rank join")
            except WeightSyncTimeout as e:
                missing = [r for r in range(self.world_size) if not self.store.check([f"join/{r}"])]
                raise WeightSyncTimeout(f"{e} (missing: {', '.join(role(r) for r in missing) or 'none'})") from None

    # -- one round ---------------------------------------------------------------------------------------
    def publish(self, r: int, meta: bytes) -> None:
        if r >= 2:  # everyone acked round r-1, so it finished r-2: drop its keys
            for k in [f"r{r - 2}/meta", f"r{r - 2}/go"] + [f"r{r - 2}/ack/{i}" for i in range(1, self.world_size)]:
                self.store.delete_key(k)
        self.store.set(f"r{r}/meta", meta)

    def collect_acks(self, r: int) -> None:
        """Rank 0: wait for every rank's verdict on the layout, then tell all to go (or abort)."""
        keys = {i: f"r{r}/ack/{i}" for i in range(1, self.world_size)}
        try:
            self.wait(keys, f"round {r} weight-layout acks")
        except WeightSyncTimeout as e:
            self.store.set(f"r{r}/go", f"abort: {e}".encode())
            raise
        errors = [(i, self.store.get(k).decode()) for i, k in keys.items()]
        errors = [f"{role(i)}: {msg}" for i, msg in errors if msg != "ok"]
        if errors:
            msg = "weights do not match the receivers' models: " + " | ".join(errors)
            self.store.set(f"r{r}/go", f"abort: {msg}".encode())
            raise WeightMismatch(f"{role(0)}: {msg}")
        self.store.set(f"r{r}/go", b"go")

    def fetch_meta(self, r: int, timeout_s: float | None) -> bytes:
        self.wait({0: f"r{r}/meta"}, f"round {r} weights (rank 0 has not called send)", timeout_s)
        return self.store.get(f"r{r}/meta")

    def ack(self, r: int, error: str = "") -> None:
        self.store.set(f"r{r}/ack/{self.rank}", (error or "ok").encode())

    def await_go(self, r: int) -> None:
        self.wait({0: f"r{r}/go"}, f"rank 0's go for round {r}")
        go = self.store.get(f"r{r}/go").decode()
        if go != "go":
            raise WeightSyncError(f"{role(self.rank)}: round {r} aborted by rank 0: {go.removeprefix('abort: ')}")
