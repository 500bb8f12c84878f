"""Decode GEMM sweep: `engine.triton_gemm.skinny_linear` vs cuBLAS (`F.linear`) on the projections of one model
shape, at the row counts of decode batches, as a fraction of the copy bandwidth measured in the same run.

    python3 bench/gemm.py --rows 1,16,64 --out $OUT/gemm.json

Each product is timed inside a CUDA graph (as the engine runs it: no launch overhead) over enough distinct
weight copies to exceed L2 (>= 512 MB streamed per replay), so the time is HBM time. For every row count the
table sums one decode step's GEMMs (q/k/v, o, gate/up, down per layer, and the LM head) for cuBLAS, for the
engine's default config and for the best config of the sweep (per product), so the default can be chosen
from the same numbers.

`--chain V1,V2,...` also times one decode step's GEMMs as the engine runs them: per layer q/k/v -> o (on the q
columns) -> gate/up with SwiGLU -> down, each product's input the previous one's output, 36 layers of distinct
weights (an RMSNorm after down, as in the engine), then the LM head, in one CUDA graph. That
is where launch ramps and tails show, which the per-product sweep (one product repeated) hides. Variants:
`cublas` (F.linear everywhere), `engine` (the engine's routing), `triton` (the skinny kernel for every
product), with `+bnN` (block_n) / `+bmM` (block_m) / `+stS` (stages) appended, e.g. `triton+bm32+st3`.
Every variant's final output is compared with the first one's (only the same kernels agree bit for bit: 36
layers amplify a last-bit rounding difference). The Hopper options tried on it (tensor-descriptor loads,
programmatic dependent launch) are on branch `exp/pdl-tma`: neither helped (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import copy_bandwidth  # noqa: E402
from engine import cublaslt  # noqa: E402
from engine.cublaslt import graph_ms  # noqa: E402
from engine.triton_gemm import skinny_linear  # noqa: E402

SHAPES = {  # name -> (N, K, times per step); Qwen3-4B: hidden 2560, 32 x 128 q heads, 8 kv heads, MLP 9728
    "qwen3-4b": {"qkv": (6144, 2560, 36), "o": (2560, 4096, 36), "gate_up": (19456, 2560, 36),
                 "down": (2560, 9728, 36), "lm_head": (151936, 2560, 1)},
    "qwen3-0.6b": {"qkv": (4096, 1024, 28), "o": (1024, 2048, 28), "gate_up": (6144, 1024, 28),
                   "down": (1024, 3072, 28), "lm_head": (151936, 1024, 1)},
}


def chain_product(variant: str):
    """(x, w, gated) -> y for one `--chain` variant."""
    from engine import decode_linear as dl, triton_gemm

    parts = variant.split("+")
    tune = {}
    for p in parts[1:]:
        key = {"bn": "block_n", "bm": "block_m", "st": "num_stages"}.get(p[:2])
        if key is None or not p[2:].isdigit():
            raise SystemExit(f"--chain {variant}: unknown part {p!r} (bnN, bmM or stS)")
        tune[key] = int(p[2:])
    if parts[0] == "cublas":
        return lambda x, w, gated: triton_gemm.silu_mul(F.linear(x, w)) if gated else F.linear(x, w)
    if parts[0] in ("engine", "tuned"):  # tuned: the engine's routing after `tune_decode_gemms` (see `chain`)
        return lambda x, w, gated: dl.decode_swiglu(x, w) if gated else dl.decode_linear(x, w)
    if parts[0] == "triton":
        return lambda x, w, gated: skinny_linear(x, w, gated=gated, **tune)
    raise SystemExit(f"--chain {variant}: starts with cublas, engine, tuned or triton")


def tune_shapes(weights: list[dict], head: torch.Tensor, m: int) -> list[dict]:
    """`cublaslt.tune` for each product at m rows that the engine leaves to cuBLAS, over the layers' weights."""
    from engine import triton_gemm

    groups = [[w[name] for w in weights] for name in weights[0]] + [[head]]
    return [cublaslt.tune(m, ws) for ws in groups if not triton_gemm.takes(m, ws[0].shape[0])]


def chain(shape: str, rows: list[int], variants: list[str], copy_bw: float) -> list[dict]:
    """One decode step's GEMMs chained layer by layer (module docstring), per row count and variant."""
    dev, dtype = torch.device("cuda"), torch.bfloat16
    prods = SHAPES[shape]
    layers = prods["qkv"][2]
    q_cols = prods["o"][1]
    weights = [{name: torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5
                for name, (n, k, _) in prods.items() if name != "lm_head"} for _ in range(layers)]
    head = torch.randn(prods["lm_head"][0], prods["lm_head"][1], device=dev, dtype=dtype) / prods["lm_head"][1] ** 0.5
    nbytes = sum(times * n * k * 2 for n, k, times in prods.values())  # one step's weights
    out = []
    for m in rows:
        x0 = torch.randn(m, prods["qkv"][1], device=dev, dtype=dtype)
        first = None
        for v in variants:
            gemm = chain_product(v)
            cublaslt.clear()
            if v.startswith("tuned"):  # the chain's own weights, grouped by shape, as the engine tunes its model's
                for r in tune_shapes(weights, head, m):
                    print(f"  tuned M={m} N={r['N']} K={r['K']}: F.linear {r['f_linear_us']:.1f} us, best "
                          f"{r.get('best')} {r.get('best_us', float('nan')):.1f} -> {r['choice']}", flush=True)

            def step():
                h = x0
                for w in weights:
                    a = gemm(h, w["qkv"], False)
                    h = gemm(gemm(gemm(a[:, :q_cols], w["o"], False), w["gate_up"], True), w["down"], False)
                    # SwiGLU squares the scale layer by layer (36 layers vanish or overflow): an RMSNorm
                    # rescales it, where the engine runs its own before the next q/k/v
                    h = F.rms_norm(h, (h.shape[-1],))
                return gemm(h, head, False)

            ms = graph_ms(step, replays=10)
            cublaslt.clear()
            y = step().float()
            first = y if first is None else first
            row = {"rows": m, "variant": v, "ms": ms, "frac": nbytes / (ms * 1e-3) / copy_bw,
                   "max_diff_vs_first": (y - first).abs().max().item(), "ref_max": first.abs().max().item()}
            out.append(row)
            print(f"chain M={m:4d} {v:28s} {ms:.3f} ms  {row['frac']:.1%} of copy BW  "
                  f"max |diff| vs {variants[0]} {row['max_diff_vs_first']:.3g} (of {row['ref_max']:.3g})", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-4b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--products", default="", help="comma-separated subset of the shape's products (default all)")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--block-k", default="128,256")
    ap.add_argument("--waves", default="1,2,4")
    ap.add_argument("--stages", default="3,4,5")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--block-m", default="0", help="row blocks to sweep (0: the engine's choice for the rows)")
    ap.add_argument("--splits", default="0", help="K splits to sweep, any count (0: the engine's rule from --waves)")
    ap.add_argument("--inductor", type=int, default=0, help="1: also time Inductor's max-autotune GEMM (its Triton "
                    "templates vs cuBLAS, picked per shape) as a third column")
    ap.add_argument("--lt", type=int, default=0, help="1: also time F.linear through cuBLASLt (a column of its own)")
    ap.add_argument("--lt-algos", type=int, default=0, help="N > 0: also time up to N cuBLASLt algorithms (its "
                    "heuristic's list plus split-K variants, engine/cublaslt.py) and report the fastest")
    ap.add_argument("--chain", default="", help="variants of the chained step (module docstring), e.g. "
                    "cublas,engine,triton,triton+bm32")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    grid = list(itertools.product(*(ints(v) for v in (a.block_n, a.block_k, a.waves, a.stages, a.warps, a.block_m,
                                                                    a.splits))))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape,
           "copy_bw": copy_bandwidth(), "cases": []}
    print(f"{res['device']} copy {res['copy_bw'] / 1e12:.2f} TB/s, {len(grid)} configs", flush=True)
    if a.chain:
        res["chain"] = chain(a.shape, ints(a.rows), a.chain.split(","), res["copy_bw"])
        Path(a.out).write_text(json.dumps(res, indent=1))
        if a.products == "none":
            return 0
    steps = {}
    for name, (n, k, times) in SHAPES[a.shape].items():
        if a.products and name not in a.products.split(","):
            continue
        copies = max(1, -(-(512 << 20) // (n * k * 2)))
        ws = [torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5 for _ in range(copies)]
        for m in ints(a.rows):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            ref = F.linear(x.float(), ws[0].float())
            nbytes = n * k * 2 + (m * k + m * n) * 2
            case = {"product": name, "rows": m, "N": n, "K": k, "bytes": nbytes, "configs": []}
            case["cublas_ms"] = graph_ms(lambda: [F.linear(x, w) for w in ws]) / copies
            if a.lt:  # the same F.linear through cuBLASLt's heuristics (torch's preferred_blas_library)
                torch.backends.cuda.preferred_blas_library("cublaslt")
                case["cublaslt_ms"] = graph_ms(lambda: [F.linear(x, w) for w in ws]) / copies
                case["cublaslt_err"] = (F.linear(x, ws[0]).float() - ref).abs().max().item()
                torch.backends.cuda.preferred_blas_library("cublas")
            if a.lt_algos:
                cands = cublaslt.candidates(m, n, k, dtype, 0, a.lt_algos)
                base, timed = cublaslt.time_candidates(x, ws, cands, replays=10)
                timed.sort(key=lambda t: t[1])
                case["lt_algos"] = [{"label": c.label, "ms": ms, "workspace": c.workspace} for c, ms in timed]
                case["lt_f_linear_ms"] = base
                if timed:
                    case["cublaslt_best_ms"] = timed[0][1]
            if a.inductor:  # one shape-specialised compile per (product, rows): autotuning happens in the warm-up
                mm = torch.compile(lambda x, w: F.linear(x, w), mode="max-autotune-no-cudagraphs", dynamic=False)
                case["inductor_ms"] = graph_ms(lambda: [mm(x, w) for w in ws]) / copies
                case["inductor_err"] = (mm(x, ws[0]).float() - ref).abs().max().item()
            case["default_ms"] = graph_ms(lambda: [skinny_linear(x, w) for w in ws]) / copies
            err = (skinny_linear(x, ws[0]).float() - ref).abs().max().item()
            case["default_err"] = err
            for bn, bk, wv, st, wp, bm, sp in grid:
                tune = dict(block_n=bn, block_k=bk, waves=wv, num_stages=st, num_warps=wp, block_m=bm or None,
                            splits=sp or None)
                try:
                    e = (skinny_linear(x, ws[0], **tune).float() - ref).abs().max().item()
                    ms = graph_ms(lambda: [skinny_linear(x, w, **tune) for w in ws]) / copies
                except Exception as exc:  # out of shared memory etc.: recorded, not fatal
                    case["configs"].append({**tune, "error": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                case["configs"].append({**tune, "ms": ms, "err": e})
            ok = [c for c in case["configs"] if "ms" in c and c["err"] <= 2e-2 * ref.abs().max().item()]
            best = min(ok, key=lambda c: c["ms"])
            case["best"] = best
            for key in ("cublas", "cublaslt", "cublaslt_best", "default", "inductor"):
                if f"{key}_ms" in case:
                    case[f"{key}_frac"] = nbytes / (case[f"{key}_ms"] * 1e-3) / res["copy_bw"]
            case["best_frac"] = nbytes / (best["ms"] * 1e-3) / res["copy_bw"]
            res["cases"].append(case)
            st = steps.setdefault(m, {"cublas_ms": 0.0, "default_ms": 0.0, "best_ms": 0.0, "bytes": 0})
            st["cublas_ms"] += times * case["cublas_ms"]
            if a.lt:
                st["cublaslt_ms"] = st.get("cublaslt_ms", 0.0) + times * case["cublaslt_ms"]
            if "cublaslt_best_ms" in case:  # the best of cuBLAS and the tuned cuBLASLt algorithm, per product
                st["tuned_ms"] = st.get("tuned_ms", 0.0) + times * min(case["cublaslt_best_ms"], case["cublas_ms"])
            st["default_ms"] += times * case["default_ms"]
            st["best_ms"] += times * best["ms"]
            st["bytes"] += times * nbytes
            ind = f"inductor {case['inductor_ms'] * 1e3:.1f} us  " if a.inductor else ""
            ind += f"cuBLASLt {case['cublaslt_ms'] * 1e3:.1f} us {case['cublaslt_frac']:.0%}  " if a.lt else ""
            if case.get("lt_algos"):
                top = ", ".join(f"{t['label']} {t['ms'] * 1e3:.1f}" for t in case["lt_algos"][:4])
                ind += (f"cuBLASLt best of {len(case['lt_algos'])} {case['cublaslt_best_ms'] * 1e3:.1f} us "
                        f"{case['cublaslt_best_frac']:.0%} ({top})  ")
            print(f"{name:8s} M={m:4d} cuBLAS {case['cublas_ms'] * 1e3:.1f} us {case['cublas_frac']:.0%}  {ind}"
                  f"default {case['default_frac']:.0%}  "
                  f"best {case['best_frac']:.0%} {({k: v for k, v in best.items() if k not in ('ms', 'err')})}",
                  flush=True)
            Path(a.out).write_text(json.dumps({**res, "steps": steps}, indent=1))
        del ws
    for m, st in steps.items():
        frac = {k: st["bytes"] / (st[f"{k}_ms"] * 1e-3) / res["copy_bw"] for k in ("cublas", "default", "best")}
        print(f"step M={m}: cuBLAS {st['cublas_ms']:.3f} ms ({frac['cublas']:.0%})  default {st['default_ms']:.3f} "
              f"({frac['default']:.0%})  best-per-product {st['best_ms']:.3f} ({frac['best']:.0%})"
              + (f"  cuBLASLt {st['cublaslt_ms']:.3f}" if a.lt else "")
              + (f"  cuBLAS or tuned cuBLASLt {st['tuned_ms']:.3f}" if "tuned_ms" in st else ""), flush=True)
    res["steps"] = steps
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
