"""Transport benchmarks.

  python3 bench/transport.py zmq  [--scheme ipc|tcp] [--tokens 32768] --out zmq.json
      32k-token Trajectories over the ZMQ channel, one sender process → one receiver (decode included):
      MB/s and msgs/s flat out, then one-way latency p50/p99 of paced messages.
  python3 bench/transport.py nccl [--bucket-mb 256] [--worlds 2,4] --out nccl.json
      A Qwen3-4B-shaped bf16 model (~8 GB) from GPU 0 to the other GPUs, one process per GPU: our bucketed
      WeightSender/WeightReceiver (copy-out, and direct after adopt_layout) side by side with one raw
      `cupy.cuda.nccl` broadcast of the same bytes as one buffer. Needs only torch + CuPy (no msgspec/zmq).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# NVLink multicast stays off on shared machines (it can take the host's GPUs out of service).
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


# ----------------------------------------------------------------------------------------------- zmq
def _trajectory(tokens: int, seed: int = 0):
    import numpy as np
    from npr_async.messages import Trajectory
    rng = np.random.default_rng(seed)
    n, nseg = tokens, 9  # a trunk, a fork of 4 steps, a join, … : segments as the engine makes them
    seg = np.repeat(np.arange(nseg), -(-n // nseg))[:n]
    return Trajectory.build(token_ids=rng.integers(0, 151_000, n), positions=np.arange(n), segment_ids=seg,
                            parents=[[]] + [[0]] * 4 + [[0, 1, 2, 3, 4]] + [[5]] * 3,
                            logprobs=rng.standard_normal(n).astype("float32"), sampled=rng.random(n) < 0.9,
                            prompt_id="bench", prompt_len=256, finish_reason="stop", text="abcd" * n,
                            num_tokens=n - 256)


def _zmq_sender(address: str, tokens: int, count: int, pace_s: float) -> None:
    from npr_async.transport.zmq import TrajectorySender
    msg = _trajectory(tokens)
    tx = TrajectorySender(address, name="bench", hwm=64, send_timeout_s=60, linger_s=10)
    for _ in range(count):
        tx.send(msg)
        if pace_s:
            time.sleep(pace_s)
    tx.close()


def bench_zmq(args) -> dict:
    import multiprocessing as mp
    from npr_async.transport.endpoints import make_endpoint
    from npr_async.transport.zmq import TrajectoryReceiver, encode
    from npr_async.messages import Envelope
    size = len(encode(Envelope("bench", 0, 0, 0, _trajectory(args.tokens))))
    ctx = mp.get_context("fork")
    out = {"scheme": args.scheme, "tokens": args.tokens, "message_bytes": size}
    for mode, count, pace in (("throughput", args.messages, 0.0), ("latency", args.latency_messages, 0.005)):
        rx = TrajectoryReceiver(make_endpoint(args.scheme, "bench", host="127.0.0.1"), hwm=64, timeout_s=60)
        p = ctx.Process(target=_zmq_sender, args=(rx.address, args.tokens, count, pace))
        p.start()
        lat, t_first = [], None
        for i in range(count):
            env = rx.recv()
            now = time.time_ns()
            t_first = t_first or time.perf_counter()
            lat.append((now - env.ts_ns) / 1e6)
        elapsed = time.perf_counter() - t_first
        p.join()
        assert rx.lost == 0 and rx.duplicates == 0 and rx.malformed == 0
        rx.close()
        if mode == "throughput":
            out.update(messages=count, seconds=elapsed, msgs_per_s=(count - 1) / elapsed,
                       MB_per_s=(count - 1) * size / elapsed / 1e6)
        else:
            lat = sorted(lat[5:])  # skip connection warm-up
            out.update(latency_messages=len(lat), latency_ms_p50=statistics.median(lat),
                       latency_ms_p99=lat[min(len(lat) - 1, int(0.99 * len(lat)))], latency_ms_max=lat[-1])
    return out


# ---------------------------------------------------------------------------------------------- nccl
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


def _timed(op, barrier, reps: int) -> list[float]:
    import torch
    times = []
    for i in range(reps + 1):  # the first is warm-up
        barrier()
        t0 = time.perf_counter()
        op(i)
        torch.cuda.synchronize()
        barrier()  # every rank has its copy
        times.append(time.perf_counter() - t0)
    return times[1:]


def _nccl_worker(rank: int, world: int, port: int, args, result_file: str) -> None:
    import torch
    from cupy.cuda import nccl
    from npr_async.transport.weights import WeightReceiver, WeightSender
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    params = {}
    for name, shape in qwen3_4b_shapes():
        t = torch.empty(shape, dtype=torch.bfloat16, device=dev)
        t.normal_() if rank == 0 else t.zero_()
        params[name] = t
    total = sum(t.numel() * 2 for t in params.values())
    kw = dict(world_size=world, store_addr=f"127.0.0.1:{port}", timeout_s=300, device=dev)
    ep = (WeightSender("nccl", bucket_mb=args.bucket_mb, **kw) if rank == 0
          else WeightReceiver("nccl", rank=rank, **kw))
    ep.connect()
    comm, store = ep.plane.comm, ep.control.store
    one = torch.ones(1, device=dev)

    def barrier():
        comm.allReduce(one.data_ptr(), one.data_ptr(), 1, nccl.NCCL_FLOAT32, nccl.NCCL_SUM,
                       torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()

    raw = torch.empty(-(-total // 8) * 8, dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream()
    # one buffer, one call (int64 elements: cupy's count is a C int)
    t_raw = _timed(lambda i: comm.bcast(raw.data_ptr(), raw.numel() // 8, nccl.NCCL_INT64, 0, stream.cuda_stream),
                   barrier, args.reps)
    del raw
    torch.cuda.empty_cache()
    if rank == 0:
        op = lambda i: ep.send(params, version=i)  # noqa: E731
    else:
        op = lambda i: ep.recv(into=params)  # noqa: E731
    t_ours = _timed(op, barrier, args.reps)
    # bitwise check: every receiver's parameters equal rank 0's
    sums = torch.stack([t.view(torch.int16).sum(dtype=torch.int64) for t in params.values()]).cpu().tolist()
    store.set(f"bench/sums/{rank}", json.dumps(sums))
    if rank != 0:
        ep.adopt_layout(params)  # receive straight into the parameters from now on
    t_direct = _timed(op, barrier, args.reps)
    direct = ep.direct_buckets if rank != 0 else None
    store.set(f"bench/direct/{rank}", json.dumps(direct))
    if rank == 0:
        ref = store.get("bench/sums/0")
        ok = all(store.get(f"bench/sums/{r}") == ref for r in range(1, world))
        med = lambda ts: statistics.median(ts)  # noqa: E731
        gb = total / 1e9
        res = {"world": world, "receivers": world - 1, "gpu": torch.cuda.get_device_name(dev),
               "torch": torch.__version__, "nccl": nccl.get_version(), "model": "Qwen3-4B shape, bf16",
               "bytes": total, "tensors": len(params), "bucket_mb": args.bucket_mb,
               "buckets": len(ep.layout.buckets), "reps": args.reps, "bitwise_equal": ok,
               "raw_s": med(t_raw), "raw_GBps": gb / med(t_raw),
               "ours_copyout_s": med(t_ours), "ours_copyout_GBps": gb / med(t_ours),
               "ours_direct_s": med(t_direct), "ours_direct_GBps": gb / med(t_direct),
               "direct_buckets_per_rank": [json.loads(store.get(f"bench/direct/{r}")) for r in range(1, world)],
               "ratio_copyout": med(t_raw) / med(t_ours), "ratio_direct": med(t_raw) / med(t_direct),
               "all_s": {"raw": t_raw, "copyout": t_ours, "direct": t_direct}}
        Path(result_file).write_text(json.dumps(res))
    barrier()
    ep.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_nccl(args) -> dict:
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
            continue
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "res.json")
            t0 = time.perf_counter()
            mp.spawn(_nccl_worker, args=(world, _free_port(), args, f), nprocs=world, join=True)
            res = json.loads(Path(f).read_text())
            res["process_total_s"] = time.perf_counter() - t0
        print(json.dumps({k: v for k, v in res.items() if k != "all_s"}), flush=True)
        out["runs"].append(res)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    z = sub.add_parser("zmq")
    z.add_argument("--scheme", choices=["ipc", "tcp"], default="ipc")
    z.add_argument("--tokens", type=int, default=32768)
    z.add_argument("--messages", type=int, default=400)
    z.add_argument("--latency-messages", type=int, default=200)
    g = sub.add_parser("nccl")
    g.add_argument("--bucket-mb", type=float, default=256.0)
    g.add_argument("--reps", type=int, default=5)
    g.add_argument("--worlds", default="", help="comma-separated world sizes (default: 2 and all GPUs)")
    for p in (z, g):
        p.add_argument("--out", default="")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = bench_zmq(args) if args.what == "zmq" else bench_nccl(args)
    res["total_s"] = time.perf_counter() - t0
    res["date"] = time.strftime("%Y-%m-%d")
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
