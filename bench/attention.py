"""Decode-attention kernel sweep: HBM bandwidth of `engine.triton_attention.decode_attention` per launch
configuration (splits, BLOCK_N, warps, stages), to choose the engine's defaults from measurements.

    python3 bench/attention.py --rows 64,256 --ctx 256,1024 --out $OUT/attention.json

Qwen3-4B attention shape (32 query heads (`--heads`), 8 KV heads, head_dim 128, bf16), one layer's cache of
`--slots` token slots; every row reads its own `ctx` slots, laid out over the pool as `--layout` says.
GB/s = K and V bytes read ÷ kernel time (triton.testing.do_bench, L2 flushed between runs), side by side
with a device-to-device copy of the same bytes in the same run (the hardware's practical limit). Each call also
writes its rows' new k/v (`new_kv`), as the engine's decode step does. `--call engine` passes the arguments
the way the CUDA-graph step does (strided q / k / v views of one projection output, the graphs' padded table
through a rows tensor); `--call bench,engine` times both side by side.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.cublaslt import graph_ms  # noqa: E402
from engine.triton_attention import decode_attention, default_block_n, default_splits, default_stages  # noqa: E402
from engine.triton_fork_attention import fork_decode_attention  # noqa: E402
from engine.triton_qk_rope import rotate_q_k  # noqa: E402


def slot_table(layout: str, rows: int, ctx: int, num_slots: int, dev) -> torch.Tensor:
    """[rows, ctx] int32 slots (distinct but for a fork layout's trunks), laid out over a pool of `num_slots` as
    `layout` says (see --layout)."""
    if layout == "scattered":
        return torch.randperm(num_slots, device=dev)[:rows * ctx].view(rows, ctx).int()
    if layout == "lockstep":  # slot i*rows + r: what popping one slot per row per step from a fresh stack gives
        base = int(torch.randint(0, num_slots - rows * ctx + 1, ()).item())
        return (base + torch.arange(ctx, device=dev)[None, :] * rows + torch.arange(rows, device=dev)[:, None]).int()
    if layout.startswith("runs"):
        n = int(layout[4:])
        runs = -(-ctx // n)
        starts = torch.randperm(num_slots // n, device=dev)[:rows * runs].view(rows, runs, 1) * n
        return (starts + torch.arange(n, device=dev)).view(rows, runs * n)[:, :ctx].int()
    if layout.startswith("lfork"):  # as forkK@T, but laid out as a fresh pool fills: each trunk one run, the
        # branches' own slots interleaved (one slot per row per step)
        k, trunk = (int(x) for x in layout[5:].split("@"))
        groups, own = rows // k, ctx - trunk
        shared = torch.arange(groups, device=dev)[:, None] * trunk + torch.arange(trunk, device=dev)
        shared = shared.repeat_interleave(k, 0)
        mine = groups * trunk + torch.arange(own, device=dev)[None, :] * rows + torch.arange(rows, device=dev)[:, None]
        return torch.cat([shared, mine], 1).int()
    if layout.startswith("fork"):  # forkK@T: groups of K rows (branches) share their first T slots (the trunk)
        k, trunk = (int(x) for x in layout[4:].split("@"))
        if not 0 <= trunk < ctx or rows % k:
            raise ValueError(f"--layout {layout}: the trunk must fit the context {ctx} and K divide the rows {rows}")
        groups = rows // k
        perm = torch.randperm(num_slots, device=dev)[:groups * trunk + rows * (ctx - trunk)]
        shared = perm[:groups * trunk].view(groups, 1, trunk).expand(groups, k, trunk).reshape(rows, trunk)
        return torch.cat([shared, perm[groups * trunk:].view(rows, ctx - trunk)], 1).int()
    raise ValueError(f"--layout: unknown layout {layout!r} (scattered, runsN, lockstep, forkK@T)")


def engine_call_args(table: torch.Tensor, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     slots: torch.Tensor, width: int) -> dict:
    """decode_attention's arguments as the CUDA-graph decode step passes them (engine/cuda_graphs.py), for the same
    values as the bench call: q / k / v views of one [rows, (Hq + 2 Hkv) D] projection output, and the context in
    row `rows[r]` of a [2 rows + 1, width] table (the graphs keep two batches' rows and a scratch row)."""
    r, ctx = table.shape
    if width < ctx:
        raise ValueError(f"--table-width {width} is shorter than the context {ctx}")
    qkv = torch.cat([q.reshape(r, -1), k_new.reshape(r, -1), v_new.reshape(r, -1)], 1)
    hq, hkv = q.shape[1], k_new.shape[1]
    views = qkv.split([hq * q.shape[2], hkv * q.shape[2], hkv * q.shape[2]], 1)
    qv, kv, vv = (x.view(r, -1, q.shape[2]) for x in views)
    padded = torch.zeros(2 * r + 1, width, dtype=torch.int32, device=table.device)
    rows = torch.arange(r, 2 * r, dtype=torch.int32, device=table.device)  # not row r: as after a batch change
    padded[rows.long(), :ctx] = table
    lens = torch.full((r,), ctx, dtype=torch.int32, device=table.device)
    return dict(q=qv, table=padded, lens=lens, rows=rows, new_kv=(kv, vv, slots))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="64,256")
    ap.add_argument("--ctx", default="256,1024")
    ap.add_argument("--splits", default="1,2,4,8,16")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--slots", type=int, default=1 << 20)
    ap.add_argument("--heads", type=int, default=32, help="query heads (8 KV heads, head_dim 128): 32 as Qwen3-4B, "
                    "16 as Qwen3-0.6B")
    ap.add_argument("--layout", default="scattered", help="where each row's slots lie, comma-separated: "
                    "'scattered' (token by token over the pool, as after long churn), 'runsN' (runs of N consecutive "
                    "slots, the runs scattered), 'lockstep' (a fresh pool decoding every row at once: slots of a row "
                    "`rows` apart), 'forkK@T' (groups of K rows sharing their first T slots, as NPR branches share "
                    "a trunk: GB/s still counts every row's reads; unique_gbs counts a trunk once per group)")
    ap.add_argument("--graph", type=int, default=0, help="1: time inside a CUDA graph (no launch overhead; "
                    "small batches are launch-bound otherwise)")
    ap.add_argument("--defaults", type=int, default=0, help="1: only the engine's default configuration per case")
    ap.add_argument("--rotate", default="0", help="comma-separated: 1 = q / k come as projected and the launch "
                    "applies q/k-norm and RoPE (`qk_norm_rope`, as the engine's decode step), 0 = already rotated")
    ap.add_argument("--call", default="bench", help="comma-separated: 'bench' = contiguous q and new k / v, a "
                    "[rows, ctx] table; 'engine' = as the CUDA-graph decode step calls it: q / k / v strided views "
                    "of one q/k/v projection output, the graphs' padded table [2 rows + 1, --table-width] read "
                    "through a rows tensor (session 9: a change measured faster with 'bench' was slower in the engine)")
    ap.add_argument("--table-width", type=int, default=0, help="the engine call's table width (0: bench/engine.py's "
                    "without forks, prompt 128 + branch 512 + 8 = 648, or the context if longer)")
    ap.add_argument("--fork-kernel", default="0", help="comma-separated: 1 = engine/triton_fork_attention.py (a "
                    "forkK@T layout's groups read their trunk once; other layouts: every row its own group), after "
                    "the q/k kernel when --rotate 1, as the engine's big buckets (its launch takes the sweep's "
                    "block_n, warps and stages; splits are the per-row kernel's only); 0 = the per-row kernel")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    calls = a.call.split(",")
    if set(calls) - {"bench", "engine"}:
        ap.error(f"--call: {a.call!r}: give bench, engine or both")
    hq, hkv, d, dev = a.heads, 8, 128, torch.device("cuda")
    kc = torch.randn(a.slots, hkv, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    for rows, ctx, layout in itertools.product(map(int, a.rows.split(",")), map(int, a.ctx.split(",")),
                                               a.layout.split(",")):
        q = torch.randn(rows, hq, d, device=dev, dtype=torch.bfloat16)
        tables = [slot_table(layout, rows, ctx, a.slots, dev) for _ in range(8)]
        table = tables[0]
        lens = torch.full((rows,), ctx, dtype=torch.int32, device=dev)
        nbytes = 2 * rows * ctx * hkv * d * 2
        unique = len(torch.unique(table)) * 2 * hkv * d * 2  # K and V bytes of distinct slots (the 8 tables alike)
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_ms = triton.testing.do_bench(lambda: dst.copy_(src))
        copy_gbs = 2 * src.numel() / copy_ms / 1e6  # read + write
        case = {"rows": rows, "ctx": ctx, "layout": layout, "kv_bytes": nbytes, "unique_kv_bytes": unique,
                "copy_gbs": copy_gbs,
                "default_splits": default_splits(rows, hkv, dev),
                "configs": []}
        # as in the engine's decode step: each row's last slot is its new token, written by the same launch. Each
        # table writes back what its last slots hold, so timing over the other tables leaves the cache (max_err) as is
        writes = {id(t): (kc[t[:, -1].long()].clone(), vc[t[:, -1].long()].clone(), t[:, -1].contiguous())
                  for t in tables}
        engine_args = {id(t): engine_call_args(t, q, *writes[id(t)], a.table_width or max(648, ctx))
                       for t in tables} if "engine" in calls else {}
        kw = inspect.signature(decode_attention).parameters  # the engine's defaults, whatever they are now
        dflt_cfg = (case["default_splits"], default_block_n(rows, hkv), kw["num_warps"].default,
                    default_stages(rows, hkv))
        cos, sin = torch.randn(2, rows, d, device=dev, dtype=torch.bfloat16)
        norms = torch.rand(2, d, device=dev, dtype=torch.bfloat16) + 0.5
        configs = list(itertools.product(*(map(int, x.split(",")) for x in (a.splits, a.block_n, a.warps, a.stages))))
        rotations = [int(r) for r in a.rotate.split(",")]
        k, trunk = (int(x) for x in layout.split("fork")[1].split("@")) if "fork" in layout else (1, 0)
        starts = torch.tensor(list(range(0, rows, k)) + [rows] * (rows + 1 - len(range(0, rows, k))),
                              dtype=torch.int32, device=dev)
        trunks = torch.full((rows,), trunk, dtype=torch.int32, device=dev)
        runs = [(fk, cfg) for fk in map(int, a.fork_kernel.split(",")) for cfg in
                ([dflt_cfg] if a.defaults else configs)]
        for how, rot, (fk, (s, bn, w, st)) in itertools.product(calls, rotations, runs):
            rotate = (*norms, 1e-6, cos, sin) if rot else None

            def args(t, how=how):
                if how == "engine":
                    return engine_args[id(t)]
                return dict(q=q, table=t, lens=lens, new_kv=writes[id(t)], rows=torch.arange(rows, device=dev).int())

            def call(t, s=s, bn=bn, w=w, st=st, rotate=rotate, fk=fk):
                kw = args(t)
                if not fk:
                    return decode_attention(k_cache=kc, v_cache=vc, num_splits=s, block_n=bn, num_warps=w,
                                            num_stages=st, qk_norm_rope=rotate, **kw)
                if rotate is not None:  # the q/k kernel first, as the engine's fork buckets do
                    kn, vn, sl = kw["new_kv"]
                    qk = rotate_q_k(kw["q"], kn, *rotate)
                    kw = dict(kw, q=qk[:, :hq], new_kv=(qk[:, hq:], vn, sl))
                return fork_decode_attention(k_cache=kc, v_cache=vc, starts=starts, trunks=trunks, block_n=bn,
                                             num_warps=w, num_stages=st, **kw)
            ref = decode_attention(q, kc, vc, table=table, lens=lens, new_kv=writes[id(table)], qk_norm_rope=rotate)
            try:
                err = (call(table).float() - ref.float()).abs().max().item()
                if a.graph:  # as in the engine: one CUDA graph, successive calls over different slots (layers)
                    ms = graph_ms(lambda: [call(t) for t in tables]) / len(tables)
                else:
                    ms = triton.testing.do_bench(lambda: call(table))
            except Exception as e:  # out of shared memory for a tile shape: record it and go on
                case["configs"].append({"splits": s, "block_n": bn, "warps": w, "stages": st, "rotate": rot,
                                        "call": how, "fork": fk, "error": str(e)[:120]})
                continue
            case["configs"].append({"splits": s, "block_n": bn, "warps": w, "stages": st, "rotate": rot, "call": how,
                                    "fork": fk,
                                    "us": ms * 1e3, "gbs": nbytes / ms / 1e6, "unique_gbs": unique / ms / 1e6,
                                    "max_err": err})
        res["cases"].append(case)
        for how, rot, fk in itertools.product(calls, rotations, map(int, a.fork_kernel.split(","))):
            ok = [c for c in case["configs"]
                  if "us" in c and c["rotate"] == rot and c["call"] == how and c["fork"] == fk]
            best = min(ok, key=lambda c: c["us"])
            dflt = next((c for c in ok if (c["splits"], c["block_n"], c["warps"], c["stages"]) == dflt_cfg), None)
            tag = f"rotate{rot}" + ("" if how == "bench" else f"_{how}") + ("_fork" if fk else "")
            case[f"best_{tag}"], case[f"default_{tag}"] = best, dflt
            print(f"rows {rows} ctx {ctx} {layout} rotate {rot} call {how} fork kernel {fk}: copy {copy_gbs:.0f} GB/s"
                  " | default "
                  f"{dflt and round(dflt['gbs'])} GB/s, unique {dflt and round(dflt['unique_gbs'])} "
                  f"({dflt and round(dflt['us'], 1)} us) | best {best['gbs']:.0f} GB/s "
                  f"({best['us']:.1f} us) splits {best['splits']} block_n {best['block_n']} warps {best['warps']} "
                  f"stages {best['stages']}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
