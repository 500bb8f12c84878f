"""The fused samplers' GPU time per row count: `inverse_cdf_sample` (the engine loop's draw, every step) and
`gumbel_sample` (in a sampling CUDA graph), at `engine.triton_sampling.split`'s chunking, against the time to
read the logits once at the copy bandwidth measured in the same run; with --chunks, the inverse-CDF draw at
each fixed number of chunks a row too (how `split` was chosen) and at the earlier rule (1024 / b programs).

    python3 bench/sampling.py --out $OUT/sampling.json

Each time is GPU time: 20 calls captured in one CUDA graph, replayed 10 times (a single call of a few µs
would otherwise time the host's launches). Logits are float32 [b, vocab], as `compute_logits` gives them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import copy_bandwidth  # noqa: E402
from engine.cublaslt import graph_ms  # noqa: E402
from engine import triton_sampling as ts  # noqa: E402


def graph_us(fn, calls: int = 20) -> float:
    """GPU microseconds per call of `fn`, `calls` of them in one CUDA graph (a few-µs call alone would time the
    graph's launch)."""
    return 1e3 * graph_ms(lambda: [fn() for _ in range(calls)], replays=10) / calls


def at_chunks(n: int, fn) -> float:
    """fn's time with every launch split into n chunks a row (whole blocks; the inverse-CDF draw only: the
    Gumbel race needs whole 4-block steps): `split` swapped for the call."""
    def fixed(v, b, block):
        chunk = triton.cdiv(triton.cdiv(v, n), block) * block
        return chunk, triton.cdiv(v, chunk)

    rule, ts.split = ts.split, fixed
    try:
        return graph_us(fn)
    finally:
        ts.split = rule


def measure(b: int, v: int, sweep: list[int], bandwidth: float) -> dict:
    """One row count's times (µs)."""
    x = torch.randn(b, v, device="cuda") * 3
    f = torch.rand(6, b, device="cuda")  # as the engine's sampler: views of one [6, b] parameter block
    t, seed = f[0] + 0.5, torch.tensor([3], device="cuda")

    def draw():
        return ts.inverse_cdf_sample(x, t, f[4], f[5])

    earlier = max(1, min(triton.cdiv(v, 8 * ts.BLOCK), triton.cdiv(1024, b)))
    return {"read_once_us": 1e6 * b * v * 4 / bandwidth, "chunks": ts.split(v, b, ts.BLOCK)[1],
            "inverse_cdf_us": graph_us(draw), "gumbel_us": graph_us(lambda: ts.gumbel_sample(x, t, seed)),
            "earlier_rule_us": at_chunks(earlier, draw), "sweep_us": {n: at_chunks(n, draw) for n in sweep}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,16,64,96,128,256,384,512,1024,2048")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunks", default="1,2,4,8,12,19,30,38", help="fixed chunk counts to sweep ('' for none)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/sampling.py needs a CUDA device")
    bw = copy_bandwidth()
    sweep = [int(n) for n in a.chunks.split(",") if n]
    res = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "vocab": a.vocab, "rows": {}}
    head = ["rows", "read once µs", "inverse-CDF µs (chunks)", "Gumbel µs", "1024/b rule µs"]
    head += [f"{n} ch" for n in sweep]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    for b in map(int, a.rows.split(",")):
        r = res["rows"][b] = measure(b, a.vocab, sweep, bw)
        cells = [b, f"{r['read_once_us']:.1f}", f"{r['inverse_cdf_us']:.1f} ({r['chunks']})", f"{r['gumbel_us']:.1f}",
                 f"{r['earlier_rule_us']:.1f}", *(f"{us:.1f}" for us in r["sweep_us"].values())]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
