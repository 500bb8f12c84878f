"""The chained MLP launch (engine/triton_chained_mlp.py, an experiment) against the engine's two-launch MLP,
side by side in one CUDA graph per variant, on an H100/H200.

    python3 bench/chained_mlp.py --rows 1,16,64 --out $OUT/chained_mlp.json

Qwen3-4B shape (H 2560, I 9728), bf16, `--layers` distinct weight sets (36: 5.4 GB, far past L2) called back to
back inside the graph as a decode step calls its layers. "engine": `decode_swiglu` (the skinny GEMM's gated
product) then `decode_linear` for down (the skinny GEMM up to 16 rows, cuBLAS above), as `MLP.forward` runs on
the GPU; "chained": one launch for both. Reported per layer: microseconds, the weights' GB/s, and the relative
error of each against a float32 reference on the first layer.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gemm import graph_ms  # noqa: E402
from engine.decode_linear import decode_linear, decode_swiglu  # noqa: E402
from engine.triton_chained_mlp import chained_mlp  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--inter", type=int, default=9728)
    ap.add_argument("--splits", default="4,8", help="the chained launch's down-projection K splits to try (each k-range a "
                    "whole number of 64-wide K steps: 4 and 8 for Qwen3-4B)")
    ap.add_argument("--programs", default="2,3", help="persistent programs per SM to try (at 64 rows 3 fit by "
                    "shared memory and registers, bench/triton_resources.py)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    h, i, dev = a.hidden, a.inter, torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w_gu = [torch.randn(2 * i, h, device=dev, generator=gen, dtype=torch.bfloat16) / h ** 0.5 for _ in range(a.layers)]
    w_d = [torch.randn(h, i, device=dev, generator=gen, dtype=torch.bfloat16) / i ** 0.5 for _ in range(a.layers)]
    weight_bytes = (3 * h * i) * 2
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers, "cases": []}
    for rows in (int(r) for r in a.rows.split(",")):
        x = torch.randn(rows, h, device=dev, generator=gen, dtype=torch.bfloat16)
        g, u = (x.float() @ w_gu[0].float().T).to(torch.bfloat16).float().chunk(2, -1)
        ref = (g * torch.sigmoid(g) * u).to(torch.bfloat16).float() @ w_d[0].float().T
        variants = {"engine": lambda wgu, wd: decode_linear(decode_swiglu(x, wgu), wd)}
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        for s in (int(s) for s in a.splits.split(",")):
            for per_sm in (int(p) for p in a.programs.split(",")):
                variants[f"chained s{s} p{per_sm}"] = lambda wgu, wd, s=s, n=per_sm * sms: chained_mlp(
                    x, wgu, wd, splits=s, programs=n)
        case = {"rows": rows}
        for name, fn in variants.items():
            err = float((fn(w_gu[0], w_d[0]).float() - ref).norm() / ref.norm())
            ms = graph_ms(lambda: [fn(wgu, wd) for wgu, wd in zip(w_gu, w_d)]) / a.layers
            case[name] = dict(us=ms * 1e3, gbs=weight_bytes / ms / 1e6, rel_err=err)
            print(f"rows {rows:3d}  {name:20s} {ms * 1e3:7.2f} us/layer  {weight_bytes / ms / 1e6:6.0f} GB/s  "
                  f"rel err {err:.1e}", flush=True)
        res["cases"].append(case)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
