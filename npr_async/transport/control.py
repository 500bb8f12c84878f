"""The weight-sync control plane: a torch TCPStore hosted by rank 0 (the learner).

NCCL has no timeouts of its own, so every wait happens here, before a collective, with a deadline; a
timeout names the ranks that never arrived. Per round r (one `send`/`recv` pair):
  each receiver posts `r{r}/ready/{rank}` as it enters `recv`: the layout key it has already checked
  against its model ("" if none) and the version it expects → rank 0 waits for all, then posts `r{r}/go`:
    go     every receiver holds the layout and wants this version: broadcast now (the steady state: the
           only wait on the critical path is the receivers reading this key);
    check  some receiver has not checked this layout (`layout/{key}`, JSON, posted once per layout): each
           checks it and posts `r{r}/ack/{rank}` ("ok" or the mismatch) → rank 0 posts `r{r}/go2`
           ("go" or "abort: …");
    abort  a version mismatch, or a rank that never arrived.
`r{r}/go` is written with compare-and-set, so a receiver that gives up waiting can withdraw atomically:
either rank 0's verdict is there first (the receiver goes on with it) or the withdrawal is, and every rank
moves on to round r+1 (rank 0 inside the same `send`). Every wait is one blocking `get`/`multi_get`; rank 0
deletes finished rounds' keys while the broadcast runs.
"""
from __future__ import annotations

import json
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
        self._posted_layouts: list[str] = []  # rank 0: layout keys still in the store
        self._forgotten = 0  # rank 0: rounds below this have no keys left
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
        self.get(keys, what, timeout_s)

    def get(self, keys: dict[int, str], what: str, timeout_s: float | None = None) -> list[bytes]:
        """The values of `keys` (rank → key), waiting for them; on timeout name the ranks whose key never
        appeared."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not keys:
            return []
        self.store.set_timeout(timedelta(seconds=timeout_s))  # the client's own deadline: no round trip
        try:
            return self.store.multi_get(list(keys.values()))  # blocks until all exist: one round trip
        except Exception:
            missing = [r for r, k in keys.items() if not self.store.check([k])]
            if not missing:  # arrived just as the wait gave up
                return self.store.multi_get(list(keys.values()))
            names = ", ".join(role(r) for r in missing)
            raise WeightSyncTimeout(f"{role(self.rank)}: timed out after {timeout_s}s waiting for {what}: "
                                    f"{names} never arrived") from None
        finally:
            self.store.set_timeout(timedelta(seconds=self.timeout_s))

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

    # -- one round: rank 0 -------------------------------------------------------------------------------
    def post_layout(self, key: str, layout_json: bytes) -> None:
        if key not in self._posted_layouts:
            self.store.set(f"layout/{key}", layout_json)
            self._posted_layouts.append(key)

    def collect_ready(self, r: int) -> list[dict]:
        """Every receiver's ready note for round r; a rank that never arrives aborts the round."""
        keys = {i: f"r{r}/ready/{i}" for i in range(1, self.world_size)}
        try:
            return [json.loads(v) for v in self.get(keys, f"round {r}: receivers to call recv")]
        except WeightSyncTimeout as e:
            self.decide(r, {"do": "abort", "error": str(e)})
            raise

    def decide(self, r: int, verdict: dict) -> dict | None:
        """Post rank 0's verdict for round r unless a receiver withdrew first (then: its note)."""
        return self._claim(f"r{r}/go", verdict)

    def _claim(self, key: str, note: dict) -> dict | None:
        """Write `note` at `key` if nobody has (None), else return what is there."""
        body = json.dumps(note).encode()
        got = self.store.compare_set(key, "", body)
        if got != body:
            return json.loads(got)
        self.store.set(key, body)  # same value: wakes waiters on stores whose compare_set does not
        return None

    def collect_acks(self, r: int) -> None:
        """After a `check` verdict: every rank's verdict on the layout, then go2 (or abort)."""
        keys = {i: f"r{r}/ack/{i}" for i in range(1, self.world_size)}
        try:
            verdicts = self.get(keys, f"round {r} weight-layout acks")
        except WeightSyncTimeout as e:
            self.store.set(f"r{r}/go2", f"abort: {e}".encode())
            raise
        errors = [f"{role(i)}: {v.decode()}" for i, v in zip(keys, verdicts) if v != b"ok"]
        if errors:
            msg = "weights do not match the receivers' models: " + " | ".join(errors)
            self.store.set(f"r{r}/go2", f"abort: {msg}".encode())
            raise WeightMismatch(f"{role(0)}: {msg}")
        self.store.set(f"r{r}/go2", b"go")

    def forget(self, r: int, key: str) -> None:
        """Rank 0, once every rank is ready for round r (layout `key`): all are done with earlier rounds and
        other layouts, so their keys go (called while the broadcast runs: off the critical path)."""
        old = [f"layout/{k}" for k in self._posted_layouts if k != key]
        self._posted_layouts = [key]
        for q in range(self._forgotten, r):
            old += [f"r{q}/go", f"r{q}/go2"] + [f"r{q}/{kind}/{i}" for kind in ("ready", "ack")
                                                for i in range(1, self.world_size)]
        self._forgotten = max(r, self._forgotten)
        for k in old:
            self.store.delete_key(k)

    # -- one round: receivers ----------------------------------------------------------------------------
    def ready(self, r: int, key: str, expect_version: int | None) -> None:
        self.store.set(f"r{r}/ready/{self.rank}", json.dumps({"layout": key, "expect": expect_version}).encode())

    def await_verdict(self, r: int, timeout_s: float | None) -> dict:
        """Rank 0's verdict for round r. On timeout withdraw from the round (unless the verdict just came)."""
        try:
            return json.loads(self.get({0: f"r{r}/go"}, f"round {r} weights (rank 0 has not called send)",
                                       timeout_s)[0])
        except WeightSyncTimeout:
            verdict = self._claim(f"r{r}/go", {"do": "withdrawn", "rank": self.rank})
            if verdict is None:
                raise
            return verdict

    def fetch_layout(self, key: str) -> bytes:
        return self.get({0: f"layout/{key}"}, f"weight layout {key}")[0]

    def ack(self, r: int, error: str = "") -> None:
        self.store.set(f"r{r}/ack/{self.rank}", (error or "ok").encode())

    def await_go2(self, r: int) -> None:
        go = self.get({0: f"r{r}/go2"}, f"rank 0's go for round {r}")[0].decode()
        if go != "go":
            raise WeightSyncError(f"{role(self.rank)}: round {r} aborted by rank 0: {go.removeprefix('abort: ')}")
