"""Transport benchmarks.

  python3 bench/transport.py zmq  [--scheme ipc|tcp] [--tokens 32768] --out zmq.json
      32k-token Trajectories over the ZMQ channel, one sender process → one receiver (decode included):
      MB/s and msgs/s flat out, then one-way latency p50/p99 of paced messages.
  python3 bench/transport.py nccl [--bucket-mb 256,1024] [--worlds 2,4] [--modes all] --out nccl.json
      A Qwen3-4B-shaped bf16 model (~8 GB) from GPU 0 to the other GPUs, one process per GPU: our bucketed
      WeightSender/WeightReceiver in several modes (copy-out, the learner's fp32 → bf16 path, direct after
      adopt_layout, zero-copy on both sides) side by side with one raw `cupy.cuda.nccl` broadcast of the same
      bytes as one buffer; GB/s, ours/raw, "4B to N-1 receivers" seconds, and where the time goes (handshake,
      first pack, GPU broadcast). Needs only torch + CuPy (no msgspec/zmq). See bench/transport_weights.py.
  python3 bench/transport.py handshake [--worlds 2,4] [--rounds 40]      (CPU, gloo)
      The weight-sync control plane between real processes on a miniature 4B (same names, same buckets):
      per-round handshake ms, and the per-layout Python work that later rounds skip.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
import transport_weights as weights_bench  # noqa: E402

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


# ------------------------------------------------------------------------------------- weight sync
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    z = sub.add_parser("zmq")
    z.add_argument("--scheme", choices=["ipc", "tcp"], default="ipc")
    z.add_argument("--tokens", type=int, default=32768)
    z.add_argument("--messages", type=int, default=400)
    z.add_argument("--latency-messages", type=int, default=200)
    g = sub.add_parser("nccl")
    g.add_argument("--bucket-mb", type=lambda v: [float(x) for x in v.split(",")], default=[256.0],
                   help="comma-separated bucket sizes, each measured in every mode")
    g.add_argument("--reps", type=int, default=5)
    g.add_argument("--worlds", default="", help="comma-separated world sizes (default: 2 and all GPUs)")
    g.add_argument("--modes", default="all", help=f"comma-separated subset of {','.join(weights_bench.MODES)}")
    h = sub.add_parser("handshake")
    h.add_argument("--worlds", default="2,4")
    h.add_argument("--rounds", type=int, default=40)
    h.add_argument("--gap-ms", type=float, default=20.0, help="pause between rounds (receivers wait in recv)")
    for p in (z, g, h):
        p.add_argument("--out", default="")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.what == "zmq":
        res = bench_zmq(args)
    elif args.what == "nccl":
        res = weights_bench.nccl(args, _free_port)
    else:
        res = weights_bench.handshake(args)
    res["total_s"] = time.perf_counter() - t0
    res["date"] = time.strftime("%Y-%m-%d")
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
