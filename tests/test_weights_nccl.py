"""Weight sync over NCCL (CuPy) between real processes, one GPU each (up to 4): bitwise copies with the right
version, the learner's cast-while-packing path, direct landing after `adopt_layout` (receiver) and no packing
after it (sender), a layout change, a shape or version mismatch raising on every rank, and a missing rank
named on rank 0 — with the rounds still in step after each failure. The same rounds run over gloo on CPU."""
import importlib.util
import os
import re
import socket
import time

import pytest
import torch

NCCL_GPUS = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or importlib.util.find_spec("cupy") is None,
    reason="needs >= 2 CUDA devices and cupy")

BUCKET_MB = 16 / 1024  # 16 KiB: many buckets; "embed" and "big" are larger than one (lone-tensor buckets)
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # spawned ranks inherit it: no NVLink multicast


def masters(seed: int, extra: bool = False) -> dict[str, torch.Tensor]:
    """The learner's fp32 masters (and one int64 buffer), on CPU; every rank builds the same ones."""
    g = torch.Generator().manual_seed(seed)
    m = {"embed.weight": torch.randn(300, 256, generator=g)}  # 150 KiB in bf16: a bucket of its own
    for i in range(4):
        m[f"layers.{i}.q.weight"] = torch.randn(64, 96, generator=g)  # 12 KiB
        m[f"layers.{i}.norm.weight"] = torch.randn(96, generator=g)
    m["layers.4.big.weight"] = torch.randn(400, 200, generator=g)  # 156 KiB
    m.update({f"layers.{i}.k_norm.weight": torch.randn(33, generator=g) for i in range(8)})  # share a bucket
    m["counts"] = torch.randint(0, 1 << 40, (7,), generator=g)  # int64: a bucket of its own dtype
    if extra:
        m["layers.9.extra.weight"] = torch.randn(50, 70, generator=g)
    return m


def as_sent(m):  # what the receivers hold: floats in bf16
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in m.items()}


def on(device, m):
    return {k: v.to(device) for k, v in m.items()}


def assert_bitwise(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        g = got[k].cpu()
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert torch.equal(g.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8)), k


def _rank(rank: int, world: int, port: int, backend: str) -> None:
    from npr_async.transport import WeightMismatch, WeightReceiver, WeightSender, WeightSyncError, WeightSyncTimeout
    from npr_async.transport.buckets import plan
    from npr_async.transport.control import role

    if backend == "nccl":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        dev = torch.device("cpu")
    kw = dict(world_size=world, store_addr=f"127.0.0.1:{port}", timeout_s=60, device=dev)
    last = world - 1  # the rank with the wrong shape in round 13 and missing in round 17
    last_name = re.escape(role(last))
    layout0 = plan(as_sent(masters(0)), int(BUCKET_MB * 2**20))
    n_buckets = len(layout0.buckets)
    lone = sum(len(b.names) == 1 for b in layout0.buckets)
    lone_int = sum(len(b.names) == 1 and b.dtype == "int64" for b in layout0.buckets)
    assert n_buckets >= 6 and 3 <= lone < n_buckets and lone_int == 1
    if rank == 0:
        tx = WeightSender(backend, bucket_mb=BUCKET_MB, **kw)
        assert len(tx.send(on(dev, as_sent(masters(0))), 10).buckets) == n_buckets
        assert tx.direct_buckets == lone  # a lone tensor is broadcast from its own storage, the rest packed
        tx.send(on(dev, as_sent(masters(1))), 11)
        tx.send(on(dev, masters(2)), 12, dtype=torch.bfloat16)  # fp32 masters, cast while packing
        assert tx.direct_buckets == lone_int  # lone fp32 tensors need the cast: packed too
        with pytest.raises(WeightMismatch, match=rf"{last_name}.*layers.0.q.weight: shape \[64, 96\] sent"):
            tx.send(on(dev, as_sent(masters(3))), 13)
        sent = on(dev, as_sent(masters(4)))
        tx.adopt_layout(sent)  # rank 0 now broadcasts from its tensors' storage: nothing to pack
        tx.send(sent, 14)
        assert tx.direct_buckets == n_buckets
        with pytest.raises(WeightMismatch, match=r"rank 1 \(rollout generator 0\): version 15 sent, expected 99"):
            tx.send(sent, 15)
        tx.send(on(dev, as_sent(masters(6, extra=True))), 16)  # a new layout: every receiver re-checks it
        tx.control.timeout_s = 3.0
        t0 = time.monotonic()
        with pytest.raises(WeightSyncTimeout, match=rf"{last_name} never arrived"):
            tx.send(on(dev, as_sent(masters(7, extra=True))), 17)
        assert time.monotonic() - t0 < 30
        tx.control.wait({r: f"done/{r}" for r in range(1, last)}, "receivers to finish")  # keep the store up
        tx.close()
        return

    rx = WeightReceiver(backend, rank=rank, **kw)
    mine = on(dev, {k: torch.zeros_like(v) for k, v in as_sent(masters(0)).items()})
    for seed, version in ((0, 10), (1, 11), (2, 12)):
        assert rx.recv(into=mine) == version
        assert_bitwise(mine, as_sent(masters(seed)))
        # rank 1 adopted the layout after round 10: every bucket lands in its parameters
        assert rx.direct_buckets == (n_buckets if rank == 1 and version > 10 else lone)
        if rank == 1 and version == 10:
            rx.adopt_layout(mine)
    others = "aborted by rank 0"
    if rank == last:
        mine["layers.0.q.weight"] = torch.zeros(96, 64, dtype=torch.bfloat16, device=dev)
    with pytest.raises(WeightMismatch if rank == last else WeightSyncError,
                       match=r"layers.0.q.weight" if rank == last else rf"{others}.*{last_name}"):
        rx.recv(into=mine)
    if rank == last:
        mine["layers.0.q.weight"] = torch.zeros(64, 96, dtype=torch.bfloat16, device=dev)
    assert rx.recv(into=mine, expect_version=14) == 14  # in step after the failed round
    assert_bitwise(mine, as_sent(masters(4)))
    with pytest.raises(WeightMismatch if rank == 1 else WeightSyncError,
                       match=r"version 15 sent, expected 99" if rank == 1 else others):
        rx.recv(into=mine, expect_version=99 if rank == 1 else None)
    mine["layers.9.extra.weight"] = torch.zeros(50, 70, dtype=torch.bfloat16, device=dev)
    assert rx.recv(into=mine) == 16
    assert_bitwise(mine, as_sent(masters(6, extra=True)))
    if rank != last:  # the last rank never shows up for round 17
        with pytest.raises(WeightSyncError, match=rf"{others}.*{last_name} never arrived"):
            rx.recv(into=mine)
        rx.control.store.set(f"done/{rank}", b"1")
    rx.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, backend: str) -> None:
    import torch.multiprocessing as mp

    ctx = mp.spawn(_rank, args=(world, _free_port(), backend), nprocs=world, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):  # raises with the failing rank's traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{backend} weight-sync ranks still running after 300 s (world {world})")


@pytest.mark.gpu
@NCCL_GPUS
def test_nccl_weight_sync_between_gpu_processes():
    _run(min(torch.cuda.device_count(), 4), "nccl")


def test_same_rounds_over_gloo_on_cpu():
    _run(3, "gloo")
