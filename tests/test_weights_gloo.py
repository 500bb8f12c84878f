"""Weight sync over gloo between real processes: bitwise copies with the right version, zero-copy receive
after `adopt_layout`, a layout mismatch is an error on every rank, a missing rank times out naming it."""
import multiprocessing as mp
import time

import pytest
import torch

from npr_async.transport import WeightMismatch, WeightReceiver, WeightSender, WeightSyncError, WeightSyncTimeout
from npr_async.transport.buckets import plan

BUCKET_MB = 4096 / 2**20  # 4 KiB buckets: many buckets, and tensors larger than one bucket


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(40, 32, generator=g).to(torch.bfloat16),  # 2560 B
        "layers.0.q.weight": torch.randn(32, 48, generator=g).to(torch.bfloat16),  # 3072 B
        "layers.0.norm.weight": torch.randn(32, generator=g),  # float32
        "layers.0.big.weight": torch.randn(64, 40, generator=g),  # 10240 B > one bucket
        "layers.1.q.weight": torch.randn(32, 48, generator=g).to(torch.bfloat16),
        "counts": torch.randint(0, 1 << 40, (5,), generator=g),  # int64
        **{f"layers.{i}.k_norm.weight": torch.randn(16, generator=g) for i in range(8)},  # share buckets
    }


def zeros_like(m):
    return {k: torch.zeros_like(v) for k, v in m.items()}


def raw(m):
    return {k: v.contiguous().view(torch.uint8).flatten().tolist() for k, v in m.items()}


def _receiver(rank, addr, out):
    torch.set_num_threads(1)
    rx = WeightReceiver("gloo", rank=rank, world_size=3, store_addr=addr, timeout_s=20)
    mine = zeros_like(model(0))
    for step, version in enumerate((5, 6)):
        got = rx.recv(into=mine, timeout_s=20)
        out.put((rank, step, got, raw(mine), rx.direct_buckets))
        if rank == 1 and step == 0:
            rx.adopt_layout(mine)  # later receives land in these storages directly
    if rank == 2:  # round 3: this rank's model has another shape
        mine["layers.0.q.weight"] = torch.zeros(48, 32, dtype=torch.bfloat16)
    try:
        rx.recv(into=mine, timeout_s=20)
        out.put((rank, "mismatch", None))
    except WeightSyncError as e:
        out.put((rank, "mismatch", f"{type(e).__name__}: {e}"))
    if rank == 2:
        mine["layers.0.q.weight"] = torch.zeros(32, 48, dtype=torch.bfloat16)
    got = rx.recv(into=mine, timeout_s=20, expect_version=8)
    out.put((rank, "recovered", got, raw(mine)))
    if rank == 2:
        return  # never shows up for round 5
    try:
        rx.recv(into=mine, timeout_s=20)
        out.put((rank, "missing", None))
    except WeightSyncError as e:
        out.put((rank, "missing", str(e)))


def test_gloo_weight_sync_between_processes():
    ctx = mp.get_context("spawn")
    tx = WeightSender("gloo", world_size=3, store_addr="127.0.0.1:0", timeout_s=20, bucket_mb=BUCKET_MB)
    out = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(r, tx.address, out)) for r in (1, 2)]
    for p in procs:
        p.start()
    try:
        tx.connect()
        layout0 = plan(model(0), int(BUCKET_MB * 2**20))
        n_buckets = len(layout0.buckets)
        single = sum(len(b.names) == 1 for b in layout0.buckets)  # a lone tensor is its bucket: no copy
        assert n_buckets >= 5 and 0 < single < n_buckets
        for step, version in enumerate((5, 6)):
            params = model(100 + step)
            layout = tx.send(params, version)
            assert len(layout.buckets) == n_buckets and layout.version == version
            want = raw(params)
            reports = sorted(out.get(timeout=60) for _ in range(2))
            for rank, s, got, data, direct in reports:
                assert (s, got) == (step, version)
                assert data == want  # bitwise, every dtype
            # after adopt_layout rank 1 receives straight into its parameters; rank 2 copies out
            assert [r[4] for r in reports] == ([single, single] if step == 0 else [n_buckets, single])

        with pytest.raises(WeightMismatch, match=r"rank 2 \(rollout generator 1\): layers.0.q.weight: "
                                                 r"shape \[32, 48\] sent, this model has \[48, 32\]"):
            tx.send(model(7), 7)
        errors = dict((r, e) for r, _, e in (out.get(timeout=60) for _ in range(2)))
        assert errors[2].startswith("WeightMismatch: rank 2") and "layers.0.q.weight" in errors[2]
        assert errors[1].startswith("WeightSyncError: rank 1") and "aborted by rank 0" in errors[1]
        assert "rank 2" in errors[1]

        params = model(8)
        tx.send(params, 8)  # the sync survives a failed round
        for rank, tag, got, data in (out.get(timeout=60) for _ in range(2)):
            assert (tag, got, data) == ("recovered", 8, raw(params))

        tx.control.timeout_s = 2.0
        t0 = time.monotonic()
        with pytest.raises(WeightSyncTimeout, match=r"rank 2 \(rollout generator 1\) never arrived"):
            tx.send(model(9), 9)
        assert time.monotonic() - t0 < 10
        rank, tag, err = out.get(timeout=60)
        assert (rank, tag) == (1, "missing") and "aborted by rank 0" in err and "rank 2" in err
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        tx.close()
    assert [p.exitcode for p in procs] == [0, 0]


def test_missing_rank_at_connect_is_named():
    tx = WeightSender("gloo", world_size=3, store_addr="127.0.0.1:0", timeout_s=0.5)
    with pytest.raises(WeightSyncTimeout, match=r"rank 1 \(rollout generator 0\), rank 2 \(rollout generator 1\) "
                                                r"never arrived"):
        tx.connect()


def test_unreachable_learner_store_is_named():
    with pytest.raises(WeightSyncTimeout, match=r"rank 1 .* cannot reach rank 0 \(learner\)'s store at 127.0.0.1:1"):
        WeightReceiver("gloo", rank=1, world_size=2, store_addr="127.0.0.1:1", timeout_s=0.5)


def test_layout_plan_groups_by_dtype_and_bounds_buckets():
    m = model(0)
    layout = plan(m, 4096)
    for b in layout.buckets:
        assert len({m[n].dtype for n in b.names}) == 1
        assert b.nbytes <= 4096 or len(b.names) == 1  # only a single oversized tensor exceeds the bound
        assert all(o % 256 == 0 for o in b.offsets)
    assert sorted(n for b in layout.buckets for n in b.names) == sorted(m)


def _patient_or_not(rank, addr, out):
    torch.set_num_threads(1)
    rx = WeightReceiver("gloo", rank=rank, world_size=3, store_addr=addr, timeout_s=20)
    mine = zeros_like(model(0))
    if rank == 1:  # gives up on the first round: withdraws from it, then comes back
        t0 = time.monotonic()
        with pytest.raises(WeightSyncTimeout, match=r"rank 1 .*timed out after 1.0s .*rank 0 has not called send"):
            rx.recv(into=mine, timeout_s=1.0)
        out.put((rank, "gave up", time.monotonic() - t0))
    got = rx.recv(into=mine, timeout_s=20)
    out.put((rank, got, raw(mine), rx.round))


def test_receiver_that_gives_up_withdraws_and_rounds_stay_in_step():
    """A receiver's ready note from a round it left must never start a broadcast without it: its withdrawal
    moves every rank (the one still waiting, and rank 0 when it sends) to the next round."""
    ctx = mp.get_context("spawn")
    tx = WeightSender("gloo", world_size=3, store_addr="127.0.0.1:0", timeout_s=20, bucket_mb=BUCKET_MB)
    out = ctx.Queue()
    procs = [ctx.Process(target=_patient_or_not, args=(r, tx.address, out)) for r in (1, 2)]
    for p in procs:
        p.start()
    try:
        tx.connect()
        rank, tag, waited = out.get(timeout=60)
        assert (rank, tag) == (1, "gave up") and 0.9 < waited < 10
        params = model(3)
        assert tx.send(params, 3).round == 1  # round 0 was withdrawn
        for rank, got, data, next_round in (out.get(timeout=60) for _ in range(2)):
            assert (got, data, next_round) == (3, raw(params), 2)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        tx.close()
    assert [p.exitcode for p in procs] == [0, 0]
