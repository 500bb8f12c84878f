"""One rollout generator's engine call, in-process: the e2e benchmark's workload without the rest of the system.

Builds the model the way `bench/e2e.py` does (a random-init `--shape`, `--force-plans` forced plans), constructs
`engine.LLM` the way `actors/rollout.py` does (the config's engine section), and times `LLM.generate` on
`--samples` samples (the config's prompts, `rollout.samples_per_prompt` copies each, one seed per sample) with
`max_running=--samples` and a trajectory callback, like the generator's one call per step. Each call's forwards,
graph replays, steps ahead and milliseconds per forward go to stdout and `--out`; `--profile 1` adds the GPU's
busy time and its top kernels for one more call (is the loop host- or GPU-bound?). Every call reports the
garbage collector's pauses by generation; `--cprofile 1` runs one more call under cProfile (the host's top functions).

    python3 bench/rollout.py --config configs/bench_2gpu.yaml --shape qwen3-0.6b --force-plans 4 \
        --samples 96 --calls 4 --compile 0,1 --out $OUT/rollout.json

The first call of each `--compile` value captures the CUDA graphs (and compiles): it is reported, not timed
as steady state.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import msgspec
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import e2e  # noqa: E402
from bench.gpu_clocks import GpuClocks  # noqa: E402
from engine.gc_pauses import GcPauses  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench_2gpu.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--shape", default="qwen3-0.6b", choices=sorted(e2e.SHAPES) + [""],
                   help="'': the config's model preset")
    p.add_argument("--force-plans", type=int, default=4)
    p.add_argument("--samples", type=int, default=96, help="samples per call, all decoding at once")
    p.add_argument("--calls", type=int, default=4, help="calls per --compile value, the first one warm-up")
    p.add_argument("--compile", default="0", help="engine.compile_graphs values to run, e.g. 0,1")
    p.add_argument("--norm-kernel", default="1",
                   help="comma-separated: 1 = the engine's one-launch RMSNorm where the step is not compiled "
                        "(engine/triton_norm.py), 0 = the model's torch code (0,1: an A/B in one process)")
    p.add_argument("--profile", type=int, default=0, help="1: one more call under the torch profiler")
    p.add_argument("--fork-groups-from", type=int, default=-1,
                   help="engine.cuda_graphs.FORK_GROUPS_FROM for this run: buckets from this many rows also get the "
                        "fork-group attention graph (0: none; -1: the engine's)")
    p.add_argument("--cprofile", type=int, default=0,
                   help="1: one more call under cProfile (the host's share): top functions to stdout and --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--run-dir", default="/tmp/bench_rollout")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import engine.cuda_graphs as cuda_graphs
    from engine.llm import HOST_PHASES, LLM
    from engine.sampler import SamplingParams
    from npr_async.config import load_config
    from npr_async.pipeline import prepare_data
    from npr_async.tokenizer import format_prompt

    if a.fork_groups_from >= 0:
        cuda_graphs.FORK_GROUPS_FROM = a.fork_groups_from or 1 << 30
    cfg = load_config(a.config, a.overrides + ["engine.cuda_graphs=true"])
    model_dir = e2e.build_model(cfg, Path(a.run_dir), a.shape)
    if a.force_plans:
        e2e.force_guideline(model_dir, a.force_plans)
    rows, _ = prepare_data(cfg)
    base = SamplingParams.from_config(cfg.engine, cfg.rollout.sampling)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    per_prompt = cfg.rollout.samples_per_prompt
    res = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "args": vars(a), "fork_groups_from": cuda_graphs.FORK_GROUPS_FROM, "calls": []}

    def call(llm, k: int, compiled: bool, norm: bool = True) -> tuple[float, dict]:
        need = -(-a.samples // per_prompt)
        batch = [rows[(k * need + i) % len(rows)] for i in range(need)]
        prompts = [format_prompt(llm.tokenizer, r["prompt"]) for r in batch for _ in range(per_prompt)][:a.samples]
        params = [msgspec.structs.replace(base, seed=k * 100_003 + j) for j in range(len(prompts))]
        sync()
        t = time.perf_counter()
        with GcPauses() as pauses, GpuClocks() as clocks:  # a slow call: lower clocks, or more work?
            out = llm.generate(prompts, params, on_finished=lambda i, traj: None, max_running=a.samples)
            sync()
        wall = time.perf_counter() - t
        rec = {"compile": compiled, "norm_kernel": norm, "call": k, "wall_s": wall, **llm.last_stats,
               "ms_per_forward": 1e3 * wall / llm.last_stats["forwards"],
               "tokens_per_s": sum(x.num_tokens for x in out) / wall,
               "tokens_per_sample": sum(x.num_tokens for x in out) / len(out), "gc": pauses.by_generation,
               **clocks.summary()}
        res["calls"].append(rec)
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(f"compile={int(compiled)} norm={int(norm)} call {k}{' (warm-up)' if k == 0 else ''}: {wall:.3f} s, "
              f"{rec['forwards']} forwards ({rec['graph_steps']} graph, {rec['steps_ahead']} ahead), "
              f"{rec['ms_per_forward']:.2f} ms each, {rec['tokens_per_s']:,.0f} tok/s, {rec['wait_ms']:.0f} ms waiting "
              f"for the device's tokens; garbage collector "
              + ", ".join(f"gen{g} {n}x {ms:.1f} ms" for g, (n, ms) in sorted(pauses.by_generation.items()))
              + f"; {rec['jit_compiles']} Triton compiles, {rec['jit_ms'] / 1e3:.2f} s; host s: "
              + ", ".join(f"{p} {rec[f'{p}_ms'] / 1e3:.3f}" for p in HOST_PHASES)
              + (f"; SM {rec['sm_mhz']} MHz mean, {rec['sm_mhz_min']} min, {rec['power_w']} W"
                 if "sm_mhz" in rec else ""),
              flush=True)
        if k == 0 and llm.setup_stats:  # the eager kernels compiled ahead (engine/jit_warmup.py)
            st = rec["setup"] = llm.setup_stats
            print(f"  set-up: {st.get('eager_launches')} eager-kernel launches, {st.get('jit_compiles')} Triton "
                  f"compiles, {st.get('jit_ms', 0) / 1e3:.2f} s; cuBLASLt tuning "
                  f"{st.get('gemm_tuning_ms', 0) / 1e3:.2f} s, {st.get('gemm_retuned', 0)} of "
                  f"{st.get('gemm_tuned', 0)} products on another algorithm", flush=True)
        if rec["jit_compiles"]:
            rec["jit_kernels"], rec["jit_signatures"] = dict(llm.last_jit.by_kernel), llm.last_jit.signatures
            print("  compiled: " + ", ".join(f"{k} {n}x" for k, n in llm.last_jit.by_kernel.most_common()), flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
        return wall, rec

    runs = [(bool(int(c)), bool(int(n))) for c in a.compile.split(",") for n in a.norm_kernel.split(",")]
    for compiled, norm in runs:
        llm = LLM(model_dir, config=cfg.engine, device=a.device, dtype=getattr(torch, cfg.model.dtype),
                  compile_graphs=compiled)
        if not norm:
            llm.model.set_norm(None)
        for k in range(a.calls):
            call(llm, k, compiled, norm)
        if a.profile and a.device == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                wall, rec = call(llm, a.calls, compiled, norm)
            ev = prof.key_averages()
            busy = sum(e.device_time_total for e in ev) / 1e3
            top = sorted(ev, key=lambda e: -e.device_time_total)[:10]
            rec["gpu_busy_ms"] = busy
            rec["top_kernels_ms"] = {e.key[:80]: e.device_time_total / 1e3 for e in top}
            rec["top_kernels_calls"] = {e.key[:80]: e.count for e in top}
            rec["attention_by_grid"] = attention_by_grid(prof)
            Path(a.out).write_text(json.dumps(res, indent=1))
            for key, (n, ms) in sorted(rec["attention_by_grid"].items(), key=lambda x: -x[1][1])[:6]:
                print(f"  {key}: {n} launches, {ms:.1f} ms, {1e3 * ms / n:.1f} us each", flush=True)
            print(f"  GPU busy {busy:.0f} ms of {wall * 1e3:.0f} ({busy / (wall * 1e3):.0%}), "
                  f"{busy / rec['forwards']:.2f} ms per forward; top: "
                  + ", ".join(f"{k[:40]} {v:.0f}" for k, v in list(rec["top_kernels_ms"].items())[:4]), flush=True)
        if a.cprofile:
            again = functools.partial(call, llm, a.calls + a.profile, compiled, norm)
            res["calls"][-1]["cprofile"] = host_profile(again)
            Path(a.out).write_text(json.dumps(res, indent=1))
        del llm
    return 0


def host_profile(run, top: int = 30) -> str:
    """`run()` under cProfile: the functions with the most own time, printed and returned as text."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(run)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    stats = text.getvalue()
    print(stats, flush=True)
    return stats


def attention_by_grid(prof) -> dict:
    """The attention kernels' GPU time by launch grid (batch bucket x KV heads): {"name grid [..]": (launches, ms)},
    from the profiler's trace (its kernel events carry the grid)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text()).get("traceEvents", [])
    out: dict = {}
    for e in events:
        if e.get("cat") == "kernel" and "decode_kernel" in e.get("name", ""):
            key = (e["name"], str(e.get("args", {}).get("grid")))
            n, ms = out.get(key, (0, 0.0))
            out[key] = (n + 1, ms + e.get("dur", 0) / 1e3)
    return {f"{name} grid {grid}": v for (name, grid), v in out.items()}


if __name__ == "__main__":
    raise SystemExit(main())
