"""Host overhead of the `engine.LLM` decode loop, measured on the CPU with a tiny random model.

On the GPU every decode step pays the Python/launch work of the loop (scheduling, input tensors, the
sampler's kernel launches, the NPR state machine) on top of the forward's GPU time. Here the forward is a
1-layer, 64-wide model, so the rest of the step is host work; this script splits it by phase:
    schedule   Scheduler.schedule (retire, admit, plan, allocate KV, context slots)
    forward    model forward + logits (the tiny model's CPU compute; stands in for the graph replay)
    sample     the sampler (penalty, filters, draw, logprob) incl. building its per-row tensors
    wait       the step's read-back of the drawn tokens: on a GPU, the host waiting for the device
    state      Request.on_sampled (the NPR state machine)
    build      the rest of LLM._step: ids / positions / contexts / attention metadata
and counts the torch ops each phase issues per step (each is a kernel launch, ~5-10 us of host time, on
the GPU). Workload: R requests whose prompts end in `<guideline>` + K plans + `</guideline>`, so each
forks at once into K steps of --branch-len tokens, joins and writes a takeaway; the model never samples a
tag or eos (masked), so every request runs its whole budget.

    python bench/engine_host.py [--cases 16x4,64x4] [--vocab 448,151936] [--graphs 0|1] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine.llm as llm_mod  # noqa: E402
import engine.sampler as sampler_mod  # noqa: E402
from engine.model import CausalLM, ModelArgs  # noqa: E402
from engine.npr_state import Request  # noqa: E402
from engine.scheduler import Scheduler  # noqa: E402
from npr_async.config import EngineConfig  # noqa: E402
from npr_async.tags import TagIds  # noqa: E402
from npr_async.tokenizer import load_tokenizer  # noqa: E402


class NoTags(torch.nn.Module):
    """The model with every tag and eos masked out of its logits: a random model then decodes until its
    budgets end, whatever its vocabulary."""

    def __init__(self, inner: CausalLM, banned: list[int]):
        super().__init__()
        self.inner, self.args, self.model = inner, inner.args, inner.model
        mask = torch.zeros(inner.args.vocab_size)
        mask[banned] = -1e4
        self.register_buffer("mask", mask)

    def forward(self, *a):
        return self.inner(*a)

    def compute_logits(self, h):
        return self.inner.compute_logits(h) + self.mask


class Phases:
    """Wall time and torch op counts per phase, from wrappers around the loop's functions."""

    def __init__(self):
        self.t, self.ops, self.stack = defaultdict(float), defaultdict(int), []
        self.counting = False

    def wrap(self, owner, name: str, phase: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None or getattr(fn, "_phase", None):
            return
        ph = self

        def wrapped(*a, **kw):
            ph.stack.append(phase)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                ph.t[phase] += time.perf_counter() - t0
                ph.stack.pop()
                if ph.stack:  # nested: the outer phase excludes it
                    ph.t[ph.stack[-1]] -= time.perf_counter() - t0
        wrapped._phase = phase
        setattr(owner, name, wrapped)


class OpCounter(TorchDispatchMode):
    def __init__(self, phases: Phases):
        super().__init__()
        self.ph = phases

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ph.ops[self.ph.stack[-1] if self.ph.stack else "other"] += 1
        return func(*args, **(kwargs or {}))


PHASES = Phases()


def instrument(model) -> Phases:
    ph = PHASES
    try:  # the graph path (GPU): run() builds the static buffers, replay() is the forward
        from engine.cuda_graphs import DecodeGraphs
        for name, phase in (("run", "build"), ("run_items", "build"), ("replay", "forward"), ("_replay", "forward")):
            ph.wrap(DecodeGraphs, name, phase)
    except ImportError:
        pass
    ph.wrap(llm_mod.LLM, "_step", "build")
    ph.wrap(Scheduler, "schedule", "schedule")
    ph.wrap(model, "forward", "forward")
    ph.wrap(model, "compute_logits", "forward")
    ph.wrap(Request, "on_sampled", "state")
    ph.wrap(llm_mod, "sample", "sample")  # the engine's sampler, before (a function) and after (a class)
    if hasattr(llm_mod, "BatchSampler"):  # launch, and collect (the step's sync: the host waits for the GPU)
        for name in ("launch", "collect") if hasattr(llm_mod.BatchSampler, "launch") else ("__call__",):
            ph.wrap(llm_mod.BatchSampler, name, "wait" if name == "collect" else "sample")
    return ph


def build(vocab: int, hidden: int, layers: int, tok, device, shape: str = "tiny") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(model_type="qwen3", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
               tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6)
    if shape != "tiny":  # a real shape (GPU): npr_async.models presets, in bf16 with fused projections
        from npr_async.models import PRESETS

        cfg = dict(PRESETS[shape], model_type="qwen3", num_hidden_layers=layers or PRESETS[shape]["num_hidden_layers"])
        torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = CausalLM(ModelArgs.from_hf_config(cfg)).eval()
    torch.set_default_dtype(torch.float32)
    if shape != "tiny":
        model.fuse_projections()
        vocab = model.args.vocab_size
    banned = sorted(TagIds.from_tokenizer(tok).all) + [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    return NoTags(model, [b for b in banned if isinstance(b, int) and 0 <= b < vocab]).to(device)


def workload(tok, r: int, k: int, args):
    from engine.sampler import SamplingParams

    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    g = enc("<guideline>" + "".join(f"<plan>{i}: way {i}</plan>" for i in range(1, k + 1)) + "</guideline>")
    ids = enc("Question: ")[:1] * (args.prompt - len(g)) + g
    L, take = args.branch_len, args.takeaway
    kw = dict(temperature=1.0, seed=1, top_p=args.top_p, top_k=args.top_k, max_total_tokens=k * L + take,
              max_path_tokens=L + take + 8, max_step_tokens=L, max_plans=16)
    if not args.penalty:
        kw.update(repetition_penalty=1.0, branch_repetition_penalty=1.0)  # else the defaults (1.02 in steps)
    if not args.desync:
        return [ids] * r, SamplingParams(**kw)
    # unsynchronised requests, as in a rollout: request i's steps run 0.5..1.5 x L tokens, so the joins (and
    # their takeaway headers) land on different forwards
    lens = [max(2, round(L * (0.5 + i / r))) for i in range(r)]
    return [ids] * r, [SamplingParams(**{**kw, "max_step_tokens": n, "max_total_tokens": k * n + take,
                                         "max_path_tokens": n + take + 8}) for n in lens]


def run_case(model, tok, r, k, args, ph: Phases, profile: bool):
    gpu = args.device == "cuda"
    cfg = EngineConfig(kv_slots=args.slots, max_batch_tokens=8192, max_plans=16, cuda_graphs=gpu and bool(args.graphs),
                       attention_backend="triton" if gpu else "torch")
    # the heap frozen as the rollout actor has it: else a full collection of the model's and torch's objects lands
    # in some phase of the timed call (160 ms in one schedule of the 96x4 case on the CPU, 2 ms a step on average)
    llm = llm_mod.LLM(model, tok, cfg, device=args.device, compile_graphs=bool(args.compile), freeze_heap=True)
    if not gpu and args.graphs:  # the graph path's host side on the CPU (each "replay" runs the step)
        llm.use_graphs = True
    prompts, p = workload(tok, r, k, args)
    llm.generate(prompts, p)  # warm-up: the same workload (graph capture, Triton compiles, allocations)
    ph.t.clear()
    ph.ops.clear()
    prof = cProfile.Profile() if profile else None
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    trajs = llm.generate(prompts, p)
    if prof:
        prof.disable()
    sync()
    wall = time.perf_counter() - t0
    steps = llm.last_stats["forwards"]
    tokens = sum(t.num_tokens for t in trajs)
    phases = {k: 1e3 * v / steps for k, v in ph.t.items()}
    res = dict(device=args.device, graphs=llm.last_stats.get("graph_steps", 0), requests=r, k=k,
               vocab=model.args.vocab_size, steps=steps, tokens=tokens, wall_s=wall,
               ms_per_step=1e3 * wall / steps, ms_per_step_no_forward=1e3 * wall / steps - phases.get("forward", 0),
               ms_per_step_host=1e3 * wall / steps - phases.get("forward", 0) - phases.get("wait", 0),
               gc_ms=llm.last_stats["gc_ms"],
               phase_ms_per_step=phases, finish={f: sum(t.finish_reason == f for t in trajs)
                                                 for f in {t.finish_reason for t in trajs}})
    if args.count_ops:  # a second run under a dispatch mode (slow): torch ops per step per phase
        ph.ops.clear()
        with OpCounter(ph):
            llm.generate(prompts, p)
        res["ops_per_step"] = {k: round(v / steps, 1) for k, v in ph.ops.items()}
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        res["cprofile"] = s.getvalue()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="16x4,64x4", help="R requests x K plans")
    ap.add_argument("--vocab", default="448,151936")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1, help="0 with --shape: the preset's")
    ap.add_argument("--shape", default="tiny", help="tiny (--vocab/--hidden/--layers) or an npr_async.models "
                    "preset (GPU: qwen3-0.6b-shape, qwen3-4b-shape): host overhead next to real GPU work")
    ap.add_argument("--compile", type=int, default=0, help="torch.compile the graphs' decode step")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--branch-len", type=int, default=64)
    ap.add_argument("--takeaway", type=int, default=16)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--penalty", type=int, default=1, help="1: default repetition penalties (1.02 in steps)")
    ap.add_argument("--desync", type=int, default=0, help="1: step lengths 0.5..1.5 x --branch-len per request "
                    "(joins on different forwards)")
    ap.add_argument("--split-headers", type=int, default=-1, help="engine.llm.SPLIT_HEADERS for this run "
                    "(-1: the engine's; 0: headers whole, which makes their forwards eager)")
    ap.add_argument("--fused-sampler", type=int, default=1, help="engine.sampler.FUSED: 1 (the engine's) fused "
                    "inverse-CDF kernels for unfiltered rows on a GPU, 0 the torch passes")
    ap.add_argument("--step-ahead", type=int, default=-1, help="engine.llm.STEP_AHEAD for this run (-1: the "
                    "engine's; 1: a decode-only graph step launches the next one before its tokens are read)")
    ap.add_argument("--slots", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cuda: Triton attention (+ CUDA graphs with --graphs 1)")
    ap.add_argument("--graphs", type=int, default=1, help="decode-only steps through DecodeGraphs (on the CPU: "
                    "its host path, each replay running the step eagerly; needs the new engine)")
    ap.add_argument("--count-ops", type=int, default=1)
    ap.add_argument("--profile", type=int, default=1, help="cProfile (top functions by own time)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    if args.split_headers >= 0:
        llm_mod.SPLIT_HEADERS = args.split_headers
    sampler_mod.FUSED = bool(args.fused_sampler)
    if args.step_ahead >= 0:
        llm_mod.STEP_AHEAD = bool(args.step_ahead)
    torch.set_num_threads(args.threads)
    tok = load_tokenizer()
    out = []
    for vocab in [int(v) for v in args.vocab.split(",")]:
        model = build(vocab, args.hidden, args.layers, tok, args.device, args.shape)
        ph = instrument(model)
        with torch.inference_mode():
            for case in args.cases.split(","):
                r, k = (int(x) for x in case.split("x"))
                res = run_case(model, tok, r, k, args, ph, bool(args.profile))
                out.append(res)
                ms = " ".join(f"{n}={v:.2f}" for n, v in sorted(res["phase_ms_per_step"].items()))
                print(f"V={vocab} {r}x{k}: {res['steps']} steps ({res['graphs']} in graphs), {res['tokens']} tokens, "
                      f"{res['ms_per_step']:.2f} ms/step ({res['ms_per_step_no_forward']:.2f} without forward, "
                      f"{res['ms_per_step_host']:.2f} host work without the wait for the GPU) "
                      f"| {ms} | collector {res['gc_ms']:.1f} ms | finish {res['finish']}", flush=True)
                if "ops_per_step" in res:
                    print(f"  torch ops/step: {res['ops_per_step']}", flush=True)
                if "cprofile" in res:
                    print("\n".join(res["cprofile"].splitlines()[:args.top + 12]), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "engine_host.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
