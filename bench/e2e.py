"""End-to-end benchmark: K strictly on-policy steps of the real actor system per configuration.

For each rollout-generator count (scaling by actor count) and streaming on/off it builds a fresh `Cluster`,
runs `--warmup` untimed steps and `--steps` timed ones through `controller.run_step`, and reports per step:
rollout (busiest generator, and each generator's own generate time), verification (CPU seconds at the
pool's measured rate), learner wait vs compute and its tail after the rollouts, weight sync, idle time per
GPU (learner: step − its compute; generator: step − its generate time), tokens/s, and each
generator's engine loop: engine calls (one per request, `rollout.chunk_samples` samples decoding at once),
forwards, how many replayed a CUDA graph or ran a step ahead, and milliseconds per forward (`engine` in the
JSON, a line per generator). JSON to --out (rewritten after every configuration, so a cut-off run keeps what
it measured), a table to stdout.

    python3 bench/e2e.py --config configs/bench_4gpu.yaml --shape qwen3-0.6b --force-plans 4 \
        --generators 1,2,3 --streaming on,off --steps 3 --out e2e_4gpu.json
    npr-async bench e2e --config configs/tiny_cpu.yaml --steps 2 --generators 1,2 --out /tmp/e2e.json

Random weights never close a step or answer, so `--force-plans P` makes every rollout fork at once: the
model directory's chat template opens the assistant turn with a `<guideline>` of P plans (the engine forks
on a prompt that ends with `</guideline>`). Every sample then ends on a budget (`length`), which PAPO's
structural filter drops; the bench configs therefore train with `dapo`, whose learner work per token is
the same (one forward + backward of every sample) and which keeps them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen3 shapes between `small` and `qwen3-4b-shape` (config.json of Qwen/Qwen3-0.6B and -1.7B)
SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, max_position_embeddings=40960, rope_theta=1_000_000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=6144, max_position_embeddings=40960, rope_theta=1_000_000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936),
}
FORCE_MARK = "{#- npr-bench: forced guideline -#}"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="npr-async bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocation, compilation; the "
                   "learner recompiled at new micro-batch shapes in the first step after one warm-up step)")
    p.add_argument("--generators", default="", help="rollout generator counts, e.g. 1,2,3 (default: the config's)")
    p.add_argument("--streaming", default="on,off", help="learner.streaming values: on,off | on | off")
    p.add_argument("--chunks", default="", help="rollout.chunk_samples values (samples decoding at once per "
                   "generator), e.g. 16,48,96: the planner fits the generator's rate curve from them")
    p.add_argument("--scaling", choices=("strong", "weak"), default="strong",
                   help="strong: the config's prompts per step for every count; weak: prompts × generators")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random-init Qwen3 shape instead of model.preset")
    p.add_argument("--force-plans", type=int, default=0, help="open every rollout with a guideline of N plans")
    p.add_argument("--run-dir", default="", help="model and data directory (default: runs/bench_e2e)")
    p.add_argument("--out", default="", help="JSON output (default: $OUT/e2e.json when $OUT is set)")
    return p.parse_args(argv)


# --- model ---------------------------------------------------------------------------------------------
def build_model(cfg, run_dir: Path, shape: str | None) -> str:
    from npr_async.pipeline import prepare_model

    if not shape:
        return prepare_model(cfg, run_dir)
    from npr_async import models

    out = run_dir / f"model-{shape}-{cfg.model.dtype}"
    if not (out / "config.json").is_file():
        # a preset of this script, handed to models.init_model through its preset table
        models.PRESETS.setdefault(f"bench-{shape}", SHAPES[shape])
        models.init_model(f"bench-{shape}", str(out), seed=cfg.model.seed, dtype=cfg.model.dtype,
                          tokenizer_path=cfg.tokenizer.path or None)
    return str(out)


def force_guideline(model_dir: str, plans: int) -> str:
    """Make the chat template's generation prompt end with a guideline of `plans` plans (idempotent)."""
    from npr_async.tags import GUIDELINE, GUIDELINE_END, PLAN, PLAN_END

    prefix = f"{GUIDELINE}\n" + "".join(f"{PLAN}{k}: part {k}{PLAN_END}\n" for k in range(1, plans + 1)) \
        + GUIDELINE_END
    block = f"{FORCE_MARK}{{%- if add_generation_prompt %}}{{{{- {json.dumps(prefix)} }}}}{{%- endif %}}"
    jinja, cfg_file = Path(model_dir) / "chat_template.jinja", Path(model_dir) / "tokenizer_config.json"
    if jinja.is_file():
        text = jinja.read_text().split(FORCE_MARK)[0]
        jinja.write_text(text + block)
    else:
        tc = json.loads(cfg_file.read_text())
        tc["chat_template"] = tc["chat_template"].split(FORCE_MARK)[0] + block
        cfg_file.write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    return prefix


def weight_bytes(model_dir: str) -> tuple[int, int]:
    """(parameters, bytes of one broadcast): the learner holds and sends float32 master weights."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                n += int(__import__("numpy").prod(st.get_slice(k).get_shape()))
    return n, 4 * n


# --- measurement -----------------------------------------------------------------------------------------
class RecordingRollout:
    """A RolloutGenerator handle that keeps the refs of its generate() calls: their StepReports hold each
    generator's own generate time and tokens (run_step returns only the sums). Everything else forwards."""

    def __init__(self, handle, refs: list):
        self._handle, self._refs = handle, refs

    def __getattr__(self, name):
        return getattr(self._handle, name)

    @property
    def generate(self):
        handle, refs = self._handle, self._refs

        class _Method:
            @staticmethod
            def remote(*args, **kwargs):
                ref = handle.generate.remote(*args, **kwargs)
                refs.append(ref)
                return ref
        return _Method


def calibrate_verifiers(cluster, rows: list[dict], n: int) -> dict:
    """Verdicts/s of the cluster's verifier pool on the task's reference traces (before any step)."""
    tasks = [rows[i % len(rows)] for i in range(n)]
    responses = [t.get("trace") or f"\\boxed{{{t['answer']}}}" for t in tasks]
    cluster.verifiers.verify_batch(tasks[:8], responses[:8])  # warm the processes
    t0 = time.perf_counter()
    cluster.verifiers.verify_batch(tasks, responses)
    s = time.perf_counter() - t0
    workers = len(cluster.verifiers.actors)
    return {"verdicts": n, "seconds": s, "verdicts_per_s": n / s, "workers": workers,
            "verdicts_per_s_per_worker": n / s / workers}


def step_record(step: int, m: dict, reports: list, verify_rate: float) -> dict:
    """One timed step: the controller's metrics `m` and the generators' StepReports of it (fetched)."""
    gens: dict[str, list[float]] = {}
    engine: dict[str, dict[str, float]] = {}  # each generator's engine-loop counters (actors/rollout.py)
    for r in reports:
        g = gens.setdefault(r.actor, [0.0, 0])
        g[0] += r.seconds
        g[1] += r.num_tokens
        e = engine.setdefault(r.actor, {})
        for k, v in r.metrics.items():
            if k != "tokens_per_s":
                e[k] = e.get(k, 0.0) + v
    step_s = m["step_s"]
    rec = {k: m.get(k) for k in ("step_s", "rollout_s", "weight_sync_s", "learner_wait_s", "learner_compute_s",
                                 "learner_s", "rollout_tokens", "tokens_per_s", "samples", "mean_tokens",
                                 "parallel_trigger_rate", "branches_per_fork", "accuracy", "format_ok",
                                 "stale_dropped", "rollout_restarts", "loss")}
    rec.update(step=step, gen_s={a: g[0] for a, g in sorted(gens.items())},
               gen_tokens={a: g[1] for a, g in sorted(gens.items())},
               learner_tail_s=step_s - m["weight_sync_s"] - m["rollout_s"],
               verify_cpu_s=(m.get("samples") or 0) / verify_rate,
               engine={a: {**e, "ms_per_forward": 1e3 * e["engine_s"] / e["forwards"] if e.get("forwards") else None}
                       for a, e in sorted(engine.items())})
    rec["idle_s"] = {"learner": step_s - m["learner_compute_s"],
                     **{a: step_s - g[0] for a, g in sorted(gens.items())}}
    rec["idle_frac"] = {k: v / step_s for k, v in rec["idle_s"].items()}
    return rec


def summarise(steps: list[dict]) -> dict:
    if not steps:
        return {}
    mean = lambda k: sum(s[k] for s in steps) / len(steps)  # noqa: E731
    gen_s = sum(sum(s["gen_s"].values()) for s in steps)
    gen_tok = sum(sum(s["gen_tokens"].values()) for s in steps)
    tokens = sum(s["rollout_tokens"] for s in steps)
    out = {k: mean(k) for k in ("step_s", "rollout_s", "weight_sync_s", "learner_wait_s", "learner_compute_s",
                                "learner_s", "learner_tail_s", "verify_cpu_s", "tokens_per_s")}
    out.update(gen_tokens_per_s=gen_tok / gen_s,
               learner_tokens_per_s=tokens / max(sum(s["learner_compute_s"] for s in steps), 1e-9),
               tokens_per_sample=tokens / max(sum(s["samples"] or 0 for s in steps), 1),
               learner_idle=mean("idle_frac_learner"), rollout_idle=mean("idle_frac_rollout_min"),  # busiest
               rollout_idle_max=mean("idle_frac_rollout_max"),
               parallel_trigger_rate=mean("parallel_trigger_rate"), branches_per_fork=mean("branches_per_fork"))
    return out


def configurations(gens: list[int], modes: list[bool], chunks: list[int]) -> list[tuple[int, bool, int, str]]:
    """(generators, streaming, chunk_samples or 0 for the config's, label) of every run, in run order."""
    out = []
    for n in gens:
        for streaming in modes:
            for chunk in chunks or [0]:
                label = f"gen={n},stream={'on' if streaming else 'off'}" + (f",chunk={chunk}" if chunk else "")
                out.append((n, streaming, chunk, label))
    return out


def run_config(args, base_overrides: list[str], n_gen: int, streaming: bool, chunk: int, label: str,
               model_dir: str, rows: list[dict], verifier: dict | None) -> tuple[dict, dict | None]:
    import ray

    from engine.llm import HOST_PHASES
    from npr_async.config import load_config
    from npr_async.controller import Cluster, run_step, step_prompts

    over = base_overrides + [f"rollout.num_workers={n_gen}", f"learner.streaming={'true' if streaming else 'false'}"]
    over += [f"rollout.chunk_samples={chunk}"] if chunk else []
    cfg = load_config(args.config, over)
    if args.scaling == "weak":  # the same work per generator
        cfg = load_config(args.config, over + [f"rollout.prompts_per_step={cfg.rollout.prompts_per_step * n_gen}"])
    t0 = time.perf_counter()
    cluster = Cluster(cfg, model_dir, rows)
    start_s = time.perf_counter() - t0
    refs: list = []
    cluster.rollouts = [RecordingRollout(r, refs) for r in cluster.rollouts]
    steps = []
    try:
        if verifier is None:
            v = cfg.verifier
            verifier = calibrate_verifiers(cluster, rows, min(512, 16 * v.num_workers * v.processes_per_worker))
        for step in range(args.warmup + args.steps):
            prompts = step_prompts(rows, step, cfg.rollout.prompts_per_step, cfg.controller.seed)
            refs.clear()
            m = run_step(cluster, step, prompts)
            rec = step_record(step, m, ray.get(list(refs)), verifier["verdicts_per_s"])
            rec["warmup"] = step < args.warmup
            gen_idle = [v for k, v in rec["idle_frac"].items() if k != "learner"]
            rec["idle_frac_learner"] = rec["idle_frac"]["learner"]
            rec["idle_frac_rollout_min"], rec["idle_frac_rollout_max"] = min(gen_idle), max(gen_idle)
            steps.append(rec)
            print(f"  {label} step {step}{' (warmup)' if rec['warmup'] else ''}: step {rec['step_s']:.2f}s "
                  f"rollout {rec['rollout_s']:.2f}s tail {rec['learner_tail_s']:.2f}s "
                  f"sync {rec['weight_sync_s']:.3f}s {rec['tokens_per_s']:.0f} tok/s", flush=True)
            for actor, e in rec["engine"].items():  # where a generator's time went: engine steps, graphs or eager
                if e.get("forwards"):
                    print(f"    {actor}: {e['engine_calls']:.0f} engine calls, {e['forwards']:.0f} forwards "
                          f"({e['graph_steps']:.0f} CUDA-graph, {e['steps_ahead']:.0f} ahead), "
                          f"{e['ms_per_forward']:.2f} ms each, {e['engine_s']:.2f} s in the engine "
                          f"({e.get('wait_ms', 0) / 1e3:.2f} s waiting for the device's tokens); garbage collector "
                          f"{e.get('gc_ms', 0):.0f} ms, {e.get('gc_full', 0):.0f} full; "
                          f"{e.get('jit_compiles', 0):.0f} Triton compiles, {e.get('jit_ms', 0) / 1e3:.2f} s; host s: "
                          + ", ".join(f"{k} {e.get(f'{k}_ms', 0) / 1e3:.2f}" for k in HOST_PHASES), flush=True)
    finally:
        cluster.rollouts = [getattr(r, "_handle", r) for r in cluster.rollouts]
        cluster.shutdown()
    r = cfg.rollout
    run = {"label": label, "generators": n_gen, "streaming": streaming, "cluster_start_s": start_s,
           "config": {"prompts_per_step": r.prompts_per_step, "samples_per_prompt": r.samples_per_prompt,
                      "chunk_samples": r.chunk_samples, "learner_gpus": cfg.learner.num_workers * max(1, int(cfg.learner.num_gpus)),
                      "verifier_workers": cfg.verifier.num_workers, "rollout_gpus_per_worker": r.num_gpus_per_worker,
                      "weights": cfg.transport.weights, "loss": cfg.learner.loss},
           "steps": steps, "mean": summarise([s for s in steps if not s["warmup"]])}
    return run, verifier


def print_table(runs: list[dict]) -> None:
    print(f"\n{'run':<29} {'step s':>7} {'rollout':>8} {'verify*':>8} {'l.wait':>7} {'l.comp':>7} {'l.tail':>7} "
          f"{'sync':>6} {'tok/s':>8} {'gen tok/s':>9} {'idle lrn':>8} {'idle gen':>8}")
    for run in runs:
        m = run["mean"]
        if not m:
            continue
        print(f"{run['label']:<29} {m['step_s']:7.2f} {m['rollout_s']:8.2f} {m['verify_cpu_s']:8.2f} "
              f"{m['learner_wait_s']:7.2f} {m['learner_compute_s']:7.2f} {m['learner_tail_s']:7.2f} "
              f"{m['weight_sync_s']:6.3f} {m['tokens_per_s']:8.0f} {m['gen_tokens_per_s']:9.0f} "
              f"{m['learner_idle'] * 100:7.0f}% {m['rollout_idle_max'] * 100:7.0f}%")
    print("(means over the timed steps; verify* = the step's verdicts at the pool's measured rate, CPU seconds;\n"
          " idle gen = the most idle generator; l.tail = learner time after the last rollout finished)")


def environment() -> dict:
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def main(argv=None) -> int:
    import ray

    from npr_async.config import load_config
    from npr_async.controller import init_ray
    from npr_async.pipeline import prepare_data

    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, args.overrides)
    gens = [int(x) for x in (args.generators or str(cfg.rollout.num_workers)).split(",")]
    modes = [{"on": True, "off": False}[x.strip()] for x in args.streaming.split(",")]
    chunks = [int(x) for x in args.chunks.split(",") if x.strip()]
    if any(c < 1 for c in chunks):
        raise SystemExit(f"--chunks: positive sample counts, got {args.chunks!r}")
    overrides = list(args.overrides) + [f"controller.steps={args.warmup + args.steps}"]
    run_dir = Path(args.run_dir or ROOT / "runs" / "bench_e2e")
    run_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or (Path(os.environ["OUT"]) / "e2e.json" if os.environ.get("OUT") else run_dir / "e2e.json"))
    model_dir = build_model(cfg, run_dir, args.shape)
    prefix = force_guideline(model_dir, args.force_plans) if args.force_plans else ""
    params, nbytes = weight_bytes(model_dir)
    rows, _ = prepare_data(cfg)
    init_ray(load_config(args.config, overrides + [f"rollout.num_workers={max(gens)}"]))
    doc = {"meta": {"config": args.config, "overrides": args.overrides, "shape": args.shape or cfg.model.preset,
                    "parameters": params, "weight_bytes": nbytes, "forced_prefix": prefix, "scaling": args.scaling,
                    "warmup": args.warmup, "steps": args.steps, **environment()},
           "verifier": None, "runs": []}
    print(f"e2e: {params / 1e6:.0f}M parameters ({nbytes / 1e9:.2f} GB per broadcast), generators {gens}, "
          f"streaming {args.streaming}, chunks {chunks or cfg.rollout.chunk_samples}, {args.steps} timed steps "
          f"each -> {out}", flush=True)
    try:
        for n, streaming, chunk, label in configurations(gens, modes, chunks):
            run, doc["verifier"] = run_config(args, overrides, n, streaming, chunk, label, model_dir, rows,
                                              doc["verifier"])
            doc["runs"].append(run)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=2))
    finally:
        ray.shutdown()
    print_table(doc["runs"])
    print(f"verifier pool: {doc['verifier']['verdicts_per_s_per_worker']:.0f} verdicts/s per worker "
          f"({doc['verifier']['workers']} workers)\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
