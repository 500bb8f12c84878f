"""Actor-count planner: predict a strictly on-policy step from measured component rates (docs/planner.md).

One step, for a layout of `generators` rollout GPUs, `learner_gpus` learner GPUs and `verifier_workers`:

    sync ─► rollout (`chunk_samples` in flight, prompts sharded over generators) ─► verify ─► learner
            └── streaming: the learner trains on each verified wave while later waves are generated ──┘
    step = sync + learner end;   learner end = max(first arrival + all work, last arrival + last wave's work)

Pure arithmetic, no torch: `predict` models one layout, `recommend` searches the layouts of a cluster.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, replace

# A recommended layout keeps the fewest verifier workers that stay within this fraction of the step with every
# free CPU verifying (see `fewest_verifiers`).
VERIFIER_TOLERANCE = 0.005


@dataclass(frozen=True)
class Rates:
    """Measured component throughputs. Token counts are *generated* tokens (all branches) throughout, so the
    learner's rate already includes its cost of the prompt tokens."""
    gen_tokens_per_s: float  # one rollout generator GPU at `gen_batch` samples in flight
    learner_tokens_per_s: float  # one learner GPU (forward + backward of the step's samples)
    verdicts_per_s: float  # one verifier worker (actor + its process pool)
    tokens_per_sample: float  # generated tokens per sample
    model_bytes: float  # bytes of one weight broadcast
    gen_batch: float = 0.0  # samples in flight when gen_tokens_per_s was measured (0: rate independent of batch)
    gen_half_batch: float = 0.0  # samples in flight at which a generator reaches half its peak rate (0: flat)
    sync_bw_intra: float = 100e9  # bytes/s of the broadcast inside one node (NVLink)
    sync_bw_inter: float = 25e9  # bytes/s once the receivers span nodes (InfiniBand, ~200 Gb/s per GPU)
    sync_latency_s: float = 20e-6  # per hop of the broadcast
    sync_algo: str = "ring"  # ring (pipelined: NCCL's large-message broadcast) | tree (store-and-forward)
    optimizer_s: float = 0.0  # fixed cost after the last group (scale grads, optimizer step)
    learner_scaling: float = 0.95  # learner efficiency kept per doubling of its GPUs (FSDP collectives)

    def gen_rate(self, in_flight: float) -> float:
        """Tokens/s of one generator with `in_flight` samples: peak · b / (b + h), peak fixed by the
        measured point (a decode step costs about the same at small batch, so small batches are slow)."""
        h = self.gen_half_batch
        if h <= 0 or self.gen_batch <= 0:
            return self.gen_tokens_per_s
        peak = self.gen_tokens_per_s * (self.gen_batch + h) / self.gen_batch
        return peak * in_flight / (in_flight + h)

    def learner_rate(self, gpus: int) -> float:
        return self.learner_tokens_per_s * gpus * self.learner_scaling ** math.log2(max(gpus, 1))


@dataclass(frozen=True)
class Workload:
    prompts_per_step: int
    samples_per_prompt: int
    chunk_samples: int  # samples decoding at once per generator; waves of them when lengths are alike
    streaming: bool = True

    @property
    def samples(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    def shard(self, generators: int) -> int:
        """Samples of the busiest generator (prompts are sharded whole)."""
        return math.ceil(self.prompts_per_step / generators) * self.samples_per_prompt


@dataclass(frozen=True)
class Layout:
    generators: int
    learner_gpus: int
    verifier_workers: int

    @property
    def gpus(self) -> int:
        return self.generators + self.learner_gpus


@dataclass
class Prediction:
    layout: Layout
    nodes: int
    rollout_s: float  # the busiest generator's generate time
    verify_end_s: float  # when the step's last verdict reaches the buffer (from rollout start)
    learner_work_s: float  # learner compute for the whole batch
    learner_end_s: float  # learner done (from rollout start), optimizer included
    learner_tail_s: float  # learner_end − rollout_s: what the learner adds after the rollouts
    sync_s: float
    step_s: float
    learner_idle: float  # fraction of the step
    rollout_idle: float  # fraction of the step, busiest generator
    bottleneck: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = asdict(self.layout)
        return d


def broadcast_seconds(nbytes: float, receivers: int, bw: float, latency_s: float, algo: str = "ring") -> float:
    """One sender to `receivers` ranks. ring: pipelined chunks, ≈ bytes/bw plus one latency per hop
    (NCCL's large-message broadcast); tree: binomial, the whole message per level, ⌈log2(n+1)⌉ levels."""
    if receivers <= 0:
        return 0.0
    if algo == "ring":
        return nbytes / bw + receivers * latency_s
    if algo == "tree":
        return math.ceil(math.log2(receivers + 1)) * (nbytes / bw + latency_s)
    raise ValueError(f"sync algo must be ring or tree, got {algo!r}")


def predict(rates: Rates, work: Workload, layout: Layout, gpus_per_node: int = 8) -> Prediction:
    """The step time of one layout (see the module docstring and docs/planner.md)."""
    n_g, T = layout.generators, rates.tokens_per_sample
    if n_g < 1 or layout.learner_gpus < 1 or layout.verifier_workers < 1:
        raise ValueError(f"a layout needs ≥ 1 of each actor, got {layout}")
    active = min(n_g, work.prompts_per_step)  # shards are whole prompts: extra generators have nothing to do
    per_gen = work.shard(n_g)
    first_wave = min(work.chunk_samples, per_gen)
    last_wave = per_gen - work.chunk_samples * (math.ceil(per_gen / work.chunk_samples) - 1)
    rate = rates.gen_rate(first_wave)
    rollout = per_gen * T / rate
    first_done = first_wave * T / rate
    verify = layout.verifier_workers * rates.verdicts_per_s
    # the verifiers either keep up (the last wave's verdicts trail the rollouts) or are the bottleneck
    verify_end = max(rollout + active * last_wave / verify, first_done + work.samples / verify)
    first_arrival = first_done + active * first_wave / verify
    # data-parallel learner: each GPU trains whole samples, so work splits no finer than one sample per GPU
    n_l = layout.learner_gpus
    per_sample = T * n_l / rates.learner_rate(n_l)
    work_s = math.ceil(work.samples / n_l) * per_sample
    if work.streaming:
        learner_end = max(first_arrival + work_s, verify_end + math.ceil(active * last_wave / n_l) * per_sample)
    else:
        learner_end = verify_end + work_s
    learner_end += rates.optimizer_s
    nodes = math.ceil(layout.gpus / gpus_per_node)
    bw = rates.sync_bw_intra if nodes == 1 else rates.sync_bw_inter
    sync = broadcast_seconds(rates.model_bytes, n_g, bw, rates.sync_latency_s, rates.sync_algo)
    step = sync + learner_end
    # the component whose own busy time is the largest limits the step
    parts = {"rollout": rollout, "verify": work.samples / verify, "learner": work_s, "sync": sync}
    return Prediction(layout, nodes, rollout, verify_end, work_s + rates.optimizer_s, learner_end,
                      learner_end - rollout, sync, step, learner_idle=1 - (work_s + rates.optimizer_s) / step,
                      rollout_idle=1 - rollout / step, bottleneck=max(parts, key=parts.get))


def config_overrides(layout: Layout) -> list[str]:
    """The `--set` overrides that deploy a layout: one GPU per generator and per learner rank (FSDP over
    several), the verifier actors on CPUs."""
    sets = [f"rollout.num_workers={layout.generators}", "rollout.num_gpus_per_worker=1",
            f"learner.num_workers={layout.learner_gpus}", "learner.num_gpus=1",
            f"verifier.num_workers={layout.verifier_workers}"]
    return sets + (["learner.fsdp=true"] if layout.learner_gpus > 1 else [])


def verifier_workers_for(nodes: int, cpus_per_node: int, gpu_actors: int, cpus_per_gpu_actor: float = 2.0,
                         cpus_per_verifier: float = 1.0, reserved_cpus: float = 2.0) -> int:
    """Verifier workers the CPUs left by the GPU actors (and the driver, buffer) can hold; at least 1."""
    free = nodes * cpus_per_node - gpu_actors * cpus_per_gpu_actor - reserved_cpus
    return max(1, int(free // cpus_per_verifier))


def recommend(rates: Rates, work: Workload, total_gpus: int, gpus_per_node: int = 8, cpus_per_node: int = 64,
              cpus_per_gpu_actor: float = 2.0, cpus_per_verifier: float = 1.0, slack: float = 0.0) -> Prediction:
    """The layout with the fewest GPUs whose predicted step is within `slack` (a fraction) of the shortest
    on `total_gpus` GPUs (slack 0: the shortest; ties go to fewer GPUs).

    GPUs may be left unused (a generator beyond the number of prompts, or one more receiver of a slow
    broadcast, can only cost time), so a larger cluster never predicts a slower shortest step; with slack
    the answer is within (1 + slack) of that non-increasing optimum."""
    if total_gpus < 2:
        raise ValueError("a cluster needs at least 2 GPUs: one learner and one rollout generator")
    nodes = math.ceil(total_gpus / gpus_per_node)
    found = []
    for n_g in range(1, min(total_gpus - 1, work.prompts_per_step) + 1):
        for n_l in range(1, total_gpus - n_g + 1):
            n_v = verifier_workers_for(nodes, cpus_per_node, n_g + n_l, cpus_per_gpu_actor, cpus_per_verifier)
            found.append(predict(rates, work, Layout(n_g, n_l, n_v), gpus_per_node))
    fastest = min(p.step_s for p in found)
    ok = [p for p in found if p.step_s <= fastest * (1 + slack) * (1 + 1e-9)]
    return fewest_verifiers(rates, work, min(ok, key=lambda p: (p.layout.gpus, p.step_s)), gpus_per_node)


def fewest_verifiers(rates: Rates, work: Workload, best: Prediction, gpus_per_node: int = 8,
                     tolerance: float = VERIFIER_TOLERANCE) -> Prediction:
    """`best` with the fewest verifier workers whose predicted step is within `tolerance` of its own (which
    gave the verifiers every free CPU): a pool of thousands of actors for a few hundred verdicts a step would
    only cost start-up time and memory. The step never grows with more verifiers, so a bisection finds it."""
    lo, hi = 1, best.layout.verifier_workers
    limit = best.step_s * (1 + tolerance)
    while lo < hi:
        mid = (lo + hi) // 2
        if predict(rates, work, replace(best.layout, verifier_workers=mid), gpus_per_node).step_s <= limit:
            hi = mid
        else:
            lo = mid + 1
    return predict(rates, work, replace(best.layout, verifier_workers=lo), gpus_per_node)


# --- rates from a bench/e2e.py JSON --------------------------------------------------------------------
def run_workload(run: dict) -> Workload:
    c = run["config"]
    return Workload(c["prompts_per_step"], c["samples_per_prompt"], c["chunk_samples"], bool(run["streaming"]))


def rates_from_run(doc: dict, run: dict, **overrides) -> Rates:
    """Rates of one measured configuration of a bench/e2e.py JSON (the means over its timed steps)."""
    m = run["mean"]
    sync_bytes = doc["meta"]["weight_bytes"]
    # the measured sync is bytes/bw + hops·latency (ring): solve for bw at the default latency
    lat = overrides.get("sync_latency_s", Rates.sync_latency_s)
    bw = sync_bytes / max(m["weight_sync_s"] - run["generators"] * lat, 1e-6)
    kw = dict(gen_tokens_per_s=m["gen_tokens_per_s"], learner_tokens_per_s=m["learner_tokens_per_s"],
              verdicts_per_s=doc["verifier"]["verdicts_per_s_per_worker"],
              tokens_per_sample=m["tokens_per_sample"], model_bytes=sync_bytes,
              gen_batch=run_in_flight(run), sync_bw_intra=bw,
              sync_bw_inter=min(bw, Rates.sync_bw_inter))  # never faster across nodes than measured inside one
    kw.update(overrides)
    return Rates(**kw)


def run_in_flight(run: dict) -> int:
    """Samples decoding at once on each generator of a measured run (its window, or all of a smaller shard)."""
    work = run_workload(run)
    return min(work.chunk_samples, work.shard(run["generators"]))


def fit_gen_curve(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(peak tokens/s, half batch h) of `rate = peak · b / (b + h)` through (samples in flight b, tokens/s)
    points, by least squares on 1/rate = 1/peak + (h/peak) · 1/b; None with fewer than two distinct b, or
    when the points do not rise with b (no such curve)."""
    if len({b for b, _ in points}) < 2:
        return None
    slope, intercept = statistics.linear_regression([1 / b for b, _ in points], [1 / r for _, r in points])
    if slope <= 0 or intercept <= 0:
        return None
    return 1 / intercept, slope / intercept


def compare(doc_runs: list[tuple[dict, dict]], rates: Rates, gpus_per_node: int = 8) -> list[dict]:
    """Predicted vs measured for each (doc, run): the run's own layout and workload, `rates` from elsewhere."""
    rows = []
    for doc, run in doc_runs:
        lay = Layout(run["generators"], run["config"]["learner_gpus"], run["config"]["verifier_workers"])
        p = predict(rates, run_workload(run), lay, gpus_per_node)
        m = run["mean"]
        rows.append({"run": run["label"], "file": doc.get("_path", ""), "layout": asdict(lay),
                     "measured": {k: m[k] for k in ("step_s", "rollout_s", "learner_tail_s", "weight_sync_s",
                                                    "learner_idle", "rollout_idle")},
                     "predicted": {"step_s": p.step_s, "rollout_s": p.rollout_s, "learner_tail_s": p.learner_tail_s,
                                   "weight_sync_s": p.sync_s, "learner_idle": p.learner_idle,
                                   "rollout_idle": p.rollout_idle},
                     "error": p.step_s / m["step_s"] - 1 if m["step_s"] else None})
    return rows
