"""`npr-async plan`: recommend actor counts for a cluster from measured component rates (docs/planner.md).

    npr-async plan --measured e2e_2gpu.json e2e_4gpu.json [--calibrate-from e2e_2gpu.json:gen=1,stream=on]
    npr-async plan --gen-tokens-per-s 9000 --learner-tokens-per-s 30000 --verdicts-per-s 150 \
        --tokens-per-sample 900 --model-bytes 2.4e9 --prompts-per-step 64 --samples-per-prompt 8

With --measured: the rates come from one measured run (default: the first run of the first file), the
predictions are checked against every measured run, then the recommendation table for --gpus follows.
Numbers given on the command line override the measured ones.
"""
from __future__ import annotations

import json
import sys
from dataclasses import fields, replace
from pathlib import Path

RATE_FLAGS = {  # flag -> Rates field
    "gen_tokens_per_s": "rollout tokens/s of one generator GPU",
    "learner_tokens_per_s": "tokens/s of one learner GPU (generated tokens trained per second)",
    "verdicts_per_s": "verdicts/s of one verifier worker",
    "tokens_per_sample": "generated tokens per sample (all branches)",
    "model_bytes": "bytes of one weight broadcast",
    "gen_batch": "samples in flight when the generator rate was measured",
    "gen_half_batch": "samples in flight at which a generator reaches half its peak rate (0: flat)",
    "sync_bw_intra": "broadcast bytes/s inside a node",
    "sync_bw_inter": "broadcast bytes/s across nodes",
    "sync_latency_s": "seconds per broadcast hop",
    "optimizer_s": "fixed seconds after the last group",
    "learner_scaling": "learner efficiency kept per doubling of its GPUs",
}


def configure(p) -> None:
    p.add_argument("--measured", nargs="*", default=[], metavar="JSON", help="bench/e2e.py outputs")
    p.add_argument("--calibrate-from", metavar="JSON[:LABEL]",
                   help="the measured run whose rates drive the model (default: first run of the first file)")
    for name, text in RATE_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=float, help=text)
    p.add_argument("--sync-algo", choices=("ring", "tree"), help="broadcast model (default ring)")
    p.add_argument("--gpus", default="8,16,32,64,128,256,512", help="cluster sizes to plan for (comma list)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-node", type=int, default=64)
    p.add_argument("--cpus-per-gpu-actor", type=float, default=2.0)
    p.add_argument("--cpus-per-verifier", type=float, default=1.0)
    p.add_argument("--prompts-per-step", type=int, help="target batch (default: the calibration run's)")
    p.add_argument("--samples-per-prompt", type=int)
    p.add_argument("--chunk-samples", type=int, help="samples decoding at once per generator (rollout.chunk_samples)")
    p.add_argument("--slack", type=float, default=0.02,
                   help="take the fewest GPUs whose predicted step is within this fraction of the fastest")
    p.add_argument("--no-streaming", action="store_true", help="plan for learner.streaming=false")
    p.add_argument("--json", dest="json_out", help="also write everything as JSON here")


def load_measured(paths: list[str]) -> list[tuple[dict, dict]]:
    out = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        doc["_path"] = path
        if not doc.get("runs"):
            raise ValueError(f"{path}: no runs (is it a bench/e2e.py output?)")
        out += [(doc, run) for run in doc["runs"] if run.get("mean")]
    return out


def pick_calibration(measured: list[tuple[dict, dict]], spec: str | None) -> tuple[dict, dict]:
    if not spec:
        return measured[0]
    path, _, label = spec.partition(":")
    for doc, run in measured:
        if Path(doc["_path"]) == Path(path) and (not label or run["label"] == label):
            return doc, run
    raise ValueError(f"--calibrate-from {spec}: no such run; have "
                     + ", ".join(f"{d['_path']}:{r['label']}" for d, r in measured))


def run(args) -> int:
    from npr_async.planner import (Rates, Workload, compare, fit_gen_curve, rates_from_run, recommend,
                                   run_in_flight, run_workload)

    given = {k: getattr(args, k) for k in RATE_FLAGS if getattr(args, k) is not None}
    if args.sync_algo:
        given["sync_algo"] = args.sync_algo
    measured = load_measured(args.measured)
    result: dict = {}
    if measured:
        doc, calib = pick_calibration(measured, args.calibrate_from)
        curve = fit_gen_curve([(run_in_flight(r), r["mean"]["gen_tokens_per_s"]) for _, r in measured])
        if curve is not None and "gen_half_batch" not in given:  # runs at several windows: the rate curve
            given["gen_half_batch"] = curve[1]
            result["gen_curve_fit"] = {"peak_tokens_per_s": curve[0], "half_batch": curve[1]}
            print(f"generator rate fitted over the runs' windows: peak {curve[0]:.0f} tok/s, half of it at "
                  f"{curve[1]:.1f} samples in flight")
        rates = rates_from_run(doc, calib, **given)
        work = run_workload(calib)
        result["calibrated_from"] = f"{doc['_path']}:{calib['label']}"
    else:
        missing = [k for k in list(RATE_FLAGS)[:5] if k not in given]
        if missing:
            print("npr-async plan: give --measured JSON or all of "
                  + ", ".join("--" + k.replace("_", "-") for k in missing), file=sys.stderr)
            return 2
        rates = Rates(**given)
        work = Workload(args.prompts_per_step or 64, args.samples_per_prompt or 8, args.chunk_samples or 64)
    work = replace(work, **{k: v for k, v in (("prompts_per_step", args.prompts_per_step),
                                             ("samples_per_prompt", args.samples_per_prompt),
                                             ("chunk_samples", args.chunk_samples)) if v})
    if args.no_streaming:
        work = replace(work, streaming=False)
    result["rates"] = {f.name: getattr(rates, f.name) for f in fields(rates)}
    result["workload"] = {f.name: getattr(work, f.name) for f in fields(work)}
    if measured:
        result["validation"] = compare(measured, rates, args.gpus_per_node)
        print_validation(result["validation"], result["calibrated_from"])
    plans = []
    for n in [int(x) for x in args.gpus.split(",") if x.strip()]:
        p = recommend(rates, work, n, args.gpus_per_node, args.cpus_per_node, args.cpus_per_gpu_actor,
                      args.cpus_per_verifier, args.slack)
        plans.append({"gpus": n, **p.to_dict()})
    result["plans"] = plans
    print_plans(plans, work, args.slack)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


def print_validation(rows: list[dict], calibrated_from: str) -> None:
    print(f"\nPredicted vs measured (rates from {calibrated_from})")
    print(f"{'run':<29} {'gen':>3} {'lrn':>3} {'ver':>3} | {'step s':>15} | {'rollout s':>15} | "
          f"{'learner tail s':>15} | {'sync s':>15} | {'err':>6}")
    for r in rows:
        m, p, lay = r["measured"], r["predicted"], r["layout"]
        cell = lambda k: f"{m[k]:7.3f}/{p[k]:<7.3f}"  # noqa: E731
        print(f"{r['run']:<29} {lay['generators']:>3} {lay['learner_gpus']:>3} {lay['verifier_workers']:>3} | "
              f"{cell('step_s')} | {cell('rollout_s')} | {cell('learner_tail_s')} | {cell('weight_sync_s')} | "
              f"{r['error'] * 100:+5.0f}%")
    print("(each cell: measured/predicted)")


def print_plans(plans: list[dict], work, slack: float) -> None:
    from npr_async.planner import Layout, config_overrides

    print(f"\nRecommended layouts ({work.prompts_per_step} prompts × {work.samples_per_prompt} samples, "
          f"chunks of {work.chunk_samples}, streaming {'on' if work.streaming else 'off'}; fewest GPUs within "
          f"{slack * 100:.0f}% of the fastest)")
    print(f"{'GPUs':>5} {'used':>5} {'gen':>4} {'lrn':>4} {'ver':>5} {'nodes':>5} | {'step s':>8} {'rollout':>8} "
          f"{'tail':>7} {'sync':>7} | {'idle lrn':>8} {'idle gen':>8} | bottleneck")
    for p in plans:
        lay = p["layout"]
        print(f"{p['gpus']:>5} {lay['generators'] + lay['learner_gpus']:>5} {lay['generators']:>4} "
              f"{lay['learner_gpus']:>4} {lay['verifier_workers']:>5} {p['nodes']:>5} | {p['step_s']:8.3f} "
              f"{p['rollout_s']:8.3f} {p['learner_tail_s']:7.3f} {p['sync_s']:7.3f} | "
              f"{p['learner_idle'] * 100:7.0f}% {p['rollout_idle'] * 100:7.0f}% | {p['bottleneck']}")
    print("\nTo run a layout: npr-async train --config C with the row's overrides")
    for p in plans:
        print(f"{p['gpus']:>5}: " + " ".join(f"--set {o}" for o in config_overrides(Layout(**p["layout"]))))
