"""Weight-sync benchmarks (run through `bench/transport.py nccl|handshake`).

nccl: a Qwen3-4B-shaped model from GPU 0 to the other GPUs, one process per GPU, side by side in one run with
one raw `cupy.cuda.nccl` broadcast of the same bytes as ONE buffer. Modes (each: median of `reps` timed
rounds after a warm-up; receivers zeroed before each mode, then checked against rank 0):
  copyout      bf16 tensors, rank 0 packs, receivers copy out of staging   (the issue's "ours")
  learner      fp32 masters on rank 0 sent with dtype=bf16 (cast while packing), receivers copy out
               (the system's real path: the engine's fused weights cannot adopt a layout)
  learner_old  the previous learner path: `{k: v.to(bf16)}` (a cast copy of the model), then send
  direct       receivers after `adopt_layout` (the broadcast lands in their parameters)
  zerocopy     rank 0 after `adopt_layout` too: no pack, no copy-out (protocol + NCCL calls only)
handshake (CPU, gloo): the control plane with real processes, on a miniature 4B (the same 398 names and 30
buckets, every dimension / 64), plus the per-layout Python work that later rounds skip.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

MODES = ("copyout", "learner", "learner_old", "direct", "zerocopy")  # adopting modes last: adopt is one-way


def qwen3_4b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Qwen3-4B (config.json of Qwen/Qwen3-4B): tied embeddings, 36 layers, GQA 32/8 heads of 128."""
    vocab, hidden, inter, layers, hq, hkv, hd = 151_936, 2560, 9728, 36, 32, 8, 128
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (hq * hd, hidden)),
                   (p + "self_attn.k_proj.weight", (hkv * hd, hidden)),
                   (p + "self_attn.v_proj.weight", (hkv * hd, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, hq * hd)),
                   (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    return shapes + [("model.norm.weight", (hidden,))]


def _checksum(params) -> list[int]:
    """Per tensor: the int16 sum and a position-weighted sum over every 64th element (catches shifts)."""
    import torch
    out = []
    for t in params.values():
        v = t.detach().reshape(-1).view(torch.int16)
        s = v[::64].to(torch.int64)
        out.append(torch.stack([v.sum(dtype=torch.int64),
                                (s * torch.arange(s.numel(), device=s.device)).sum()]))
    return torch.stack(out).cpu().flatten().tolist()


def _median_timings(rounds: list[dict]) -> dict:
    return {k: statistics.median(r.get(k, 0.0) for r in rounds) for k in rounds[0]} if rounds else {}


def nccl_worker(rank: int, world: int, port: int, args, result_file: str) -> None:
    import torch
    from cupy.cuda import nccl
    from npr_async.transport.weights import WeightReceiver, WeightSender
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    shapes = qwen3_4b_shapes()
    gen = torch.Generator(device=dev).manual_seed(0)
    master = {n: torch.randn(s, generator=gen, device=dev) for n, s in shapes} if rank == 0 else None
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    kw = dict(world_size=world, store_addr=f"127.0.0.1:{port}", timeout_s=300, device=dev)
    ep = WeightSender("nccl", **kw) if rank == 0 else WeightReceiver("nccl", rank=rank, **kw)
    ep.connect()
    comm, store, stream = ep.plane.comm, ep.control.store, torch.cuda.current_stream()
    one = torch.ones(1, device=dev)

    def barrier():
        comm.allReduce(one.data_ptr(), one.data_ptr(), 1, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.cuda_stream)
        torch.cuda.synchronize()

    def timed(op) -> tuple[list[float], list[dict]]:
        times, timings = [], []
        for i in range(args.reps + 1):  # the first is warm-up
            barrier()
            t0 = time.perf_counter()
            op(i)
            torch.cuda.synchronize()
            barrier()  # every rank has its copy
            times.append(time.perf_counter() - t0)
            timings.append(dict(getattr(ep, "last_timings", {})))
        return times[1:], timings[1:]

    raw = torch.empty(-(-total // 8) * 8, dtype=torch.uint8, device=dev)  # int64 count: cupy's is a C int
    t_raw, _ = timed(lambda i: comm.bcast(raw.data_ptr(), raw.numel() // 8, nccl.NCCL_INT64, 0, stream.cuda_stream))
    del raw
    torch.cuda.empty_cache()
    res = {"raw_s": statistics.median(t_raw), "all_s": {"raw": t_raw}, "modes": {}}
    for mb in args.bucket_mb:
        if rank == 0:
            ep.bucket_bytes = int(mb * 2**20)
        bf16 = {n: (master[n].to(torch.bfloat16) if rank == 0 else torch.zeros(s, dtype=torch.bfloat16, device=dev))
                for n, s in shapes}  # fresh storages: nobody adopted yet
        for mode in MODES if args.modes == "all" else args.modes.split(","):
            for t in bf16.values() if rank != 0 else ():
                t.zero_()
            if mode == "direct" and rank != 0 or mode == "zerocopy" and rank == 0:
                ep.adopt_layout(bf16)  # the layout of the previous mode (same bucket size)
            if rank == 0:
                send = {"learner": lambda i: ep.send(master, i, dtype=torch.bfloat16),
                        "learner_old": lambda i: ep.send({k: v.to(torch.bfloat16) for k, v in master.items()}, i)
                        }.get(mode, lambda i: ep.send(bf16, i))
            else:
                send = lambda i: ep.recv(into=bf16)  # noqa: E731
            times, timings = timed(send)
            store.set(f"bench/{mb}/{mode}/{rank}", json.dumps({
                "sums": _checksum(bf16), "timings": _median_timings(timings),
                "direct": getattr(ep, "direct_buckets", None)}))
            if rank == 0:
                got = [json.loads(store.get(f"bench/{mb}/{mode}/{r}")) for r in range(world)]
                s = statistics.median(times)
                res["modes"][f"{mode}@{mb:g}MiB"] = {
                    "s": s, "GBps": total / 1e9 / s, "ratio": res["raw_s"] / s, "all_s": times,
                    "bitwise_equal": all(g["sums"] == got[0]["sums"] for g in got[1:]),
                    "buckets": len(ep.layout.buckets), "sender_ms": got[0]["timings"],
                    "receiver_ms": [g["timings"] for g in got[1:]], "sender_direct_buckets": got[0]["direct"],
                    "direct_buckets": [g["direct"] for g in got[1:]]}
    if rank == 0:
        res.update(world=world, receivers=world - 1, gpu=torch.cuda.get_device_name(dev), torch=torch.__version__,
                   nccl=nccl.get_version(), model="Qwen3-4B shape, bf16", bytes=total, tensors=len(shapes),
                   reps=args.reps, raw_GBps=total / 1e9 / res["raw_s"])
        Path(result_file).write_text(json.dumps(res))
    barrier()
    ep.close()


def summary(res: dict) -> str:
    n = res["receivers"]
    lines = [f"world {res['world']} ({n} receivers): raw {res['raw_s'] * 1e3:.1f} ms, {res['raw_GBps']:.0f} GB/s"]
    for name, m in res["modes"].items():
        t = m["sender_ms"]
        lines.append(f"  {name:22s} {m['s'] * 1e3:6.1f} ms {m['GBps']:5.0f} GB/s  ours/raw {m['ratio']:.3f}  "
                     f"bitwise {m['bitwise_equal']}  | handshake {t.get('handshake_ms', 0):.2f} ms, first pack "
                     f"{t.get('first_pack_ms', 0):.2f} ms, broadcast {t.get('broadcast_ms', 0):.1f} ms (GPU), "
                     f"direct buckets {m['sender_direct_buckets']}/{m['buckets']} sent, {m['direct_buckets']} received")
    for k, m in res["modes"].items():
        if not k.startswith(("copyout@", "learner@")):
            continue
        lines.append(f"  4B to {n} receivers ({k}): {m['s']:.4f} s (target <= 0.1 s), ours/raw {m['ratio']:.3f} "
                     f"(target >= 0.90)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ handshake
def _mini_params():
    import torch
    return {n: torch.zeros([max(1, d // 64) for d in s], dtype=torch.bfloat16) for n, s in qwen3_4b_shapes()}


def _handshake_receiver(rank: int, world: int, addr: str, rounds: int, q) -> None:
    import torch
    from npr_async.transport.weights import WeightReceiver
    torch.set_num_threads(1)
    rx = WeightReceiver("gloo", rank=rank, world_size=world, store_addr=addr, timeout_s=60)
    params = _mini_params()
    for i in range(rounds):
        assert rx.recv(params, expect_version=i) == i
    q.put(rank)


def handshake(args) -> dict:
    import multiprocessing as mp
    import torch
    from npr_async.transport import buckets
    from npr_async.transport.weights import WeightSender
    torch.set_num_threads(1)
    meta = {n: torch.empty(s, dtype=torch.bfloat16, device="meta") for n, s in qwen3_4b_shapes()}
    layout = buckets.plan(meta, 256 << 20)
    js = layout.to_json()

    def ms(f, n=50):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3
    out = {"tensors": len(meta), "buckets": len(layout.buckets), "layout_json_bytes": len(js), "per_layout_ms": {
        "signature (every round, both sides)": ms(lambda: buckets.signature(meta)),
        "plan": ms(lambda: buckets.plan(meta, 256 << 20)), "to_json + key": ms(lambda: (layout.to_json(), layout.key())),
        "from_json": ms(lambda: buckets.Layout.from_json(js)), "mismatches": ms(lambda: buckets.mismatches(layout, meta))},
        "runs": []}
    ctx = mp.get_context("spawn")
    for world in sorted({int(w) for w in args.worlds.split(",")} if args.worlds else {2, 4}):
        tx = WeightSender("gloo", world_size=world, store_addr="127.0.0.1:0", timeout_s=60, bucket_mb=256 / 4096)
        q = ctx.Queue()
        procs = [ctx.Process(target=_handshake_receiver, args=(r, world, tx.address, args.rounds, q))
                 for r in range(1, world)]
        for p in procs:
            p.start()
        params, rounds = _mini_params(), []
        for i in range(args.rounds):
            time.sleep(args.gap_ms / 1e3)  # receivers already waiting in recv, as between training steps
            tx.send(params, i)
            rounds.append(dict(tx.last_timings))
        for p in procs:
            p.join(60)
        assert sorted(q.get(timeout=10) for _ in procs) == list(range(1, world))
        tx.close()
        steady = rounds[1:]  # round 0 checks the layout (first contact); later rounds only say go
        out["runs"].append({"world": world, "buckets": len(tx.layout.buckets), "rounds": args.rounds,
                            "first_round_handshake_ms": rounds[0]["handshake_ms"],
                            "handshake_ms_median": statistics.median(r["handshake_ms"] for r in steady),
                            "handshake_ms_p90": sorted(r["handshake_ms"] for r in steady)[int(0.9 * len(steady))]})
        print(json.dumps(out["runs"][-1]), flush=True)
    return out


def nccl(args, free_port) -> dict:
    import tempfile
    import torch
    import torch.multiprocessing as mp
    n = torch.cuda.device_count()
    if n < 2:
        raise SystemExit(f"nccl bench needs >= 2 GPUs, found {n}")
    worlds = sorted({int(w) for w in args.worlds.split(",")} if args.worlds else {2, n})
    out = {"runs": []}
    for world in worlds:
        if world > n:
            print(f"world {world}: only {n} GPUs, skipped", flush=True)
            continue
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "res.json")
            t0 = time.perf_counter()
            mp.spawn(nccl_worker, args=(world, free_port(), args, f), nprocs=world, join=True)
            res = json.loads(Path(f).read_text())
        res["process_total_s"] = time.perf_counter() - t0
        print(summary(res), flush=True)
        out["runs"].append(res)
    return out
