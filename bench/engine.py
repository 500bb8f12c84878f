"""Engine benchmark on a random-init Qwen3-4B-shaped model (bf16, built on the GPU, nothing written to disk).

One run reports, side by side on the same GPU:
  a. decode tokens/s at several batch sizes (prompt P, N new tokens) and the fraction of the HBM roofline
     (weights + KV bytes read per decode step / the device-to-device copy bandwidth measured in this run);
  b. the same workload through HF transformers `generate` with a static cache -> our/HF ratio;
  c. NPR fork speedup: K branches of L tokens forked from one prompt vs K*L tokens in one sequence;
  d. peak GPU memory and the KV pool's capacity in tokens.
"Ours" is the engine's decode path driven directly: model forward (q/k/v and gate/up fused into single GEMMs
unless --fuse 0) + Triton slot attention + fused KV write + CUDA graphs + GPU sampling, rows reading a slot
table (branch rows repeat the prompt's slots: a fork shares the trunk's KV, nothing copied). Prefill goes
through SDPA.
  e. (--llm) the full `engine.LLM` loop (scheduler, NPR state machine, per-request sampler, CUDA graphs for
     decode-only steps) on forced-fork prompts ending in `</guideline>` with K plans, vs the direct path on
     the same rows x branch length (each case warmed up at its shapes first; a KV pool that holds it whole).
     bench/engine_host.py splits the loop's per-step host time by phase.

    python bench/engine.py [--batches 1,16,64,256] [--hf-compile 1] [--llm 1x4,16x4] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# siblings (gpu_clocks) after the repo, so that `engine` is the package and not this file
sys.path.append(str(Path(__file__).resolve().parent))
from engine.cuda_graphs import DecodeGraphs, sample  # noqa: E402
from engine.model import CausalLM, ModelArgs  # noqa: E402
from engine import triton_attention  # noqa: E402
from engine.triton_attention import store_kv  # noqa: E402
from gpu_clocks import GpuClocks  # noqa: E402

QWEN3_4B = dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                tie_word_embeddings=True, hidden_act="silu")


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    a = torch.randn(nbytes // 4, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    t = timed(lambda: [b.copy_(a) for _ in range(20)])
    del a, b
    return 2 * nbytes * 20 / t


class Prefill:
    """B prompts of n tokens each, packed row-major: KV write + causal SDPA per prompt."""

    def __init__(self, k, v, slots, b, n):
        self.k, self.v, self.slots, self.b, self.n = k, v, slots, b, n

    def __call__(self, layer, q, k, v):
        store_kv(k, v, self.k[layer], self.v[layer], self.slots)
        b, n = self.b, self.n
        o = F.scaled_dot_product_attention(*(x.view(b, n, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v)),
                                           is_causal=True, enable_gqa=True)
        return o.transpose(1, 2).reshape(b * n, q.shape[1], q.shape[2])


class Runner:
    def __init__(self, model, g: DecodeGraphs, slot_perm: torch.Tensor):
        self.model, self.g, self.perm = model, g, slot_perm
        self.decode_start, self.decode_end = (torch.cuda.Event(enable_timing=True) for _ in range(2))

    def generate(self, prompts: torch.Tensor, rows_per_prompt: int, new: int, temperature: float) -> torch.Tensor:
        """Prefill `prompts` [P, n]; fork each into `rows_per_prompt` rows sharing its KV; decode `new`
        tokens per row (the first from the prefill's logits). Everything stays on the device."""
        g, (p, n) = self.g, prompts.shape
        rows = p * rows_per_prompt
        own = self.perm[p * n:p * n + rows * new].view(rows, new).int()  # each row's own slots
        prompt_slots = self.perm[:p * n].view(p, n).int()
        g.table[:rows, :n] = prompt_slots.repeat_interleave(rows_per_prompt, 0)  # shared trunk, repeated
        g.table[:rows, n:n + new] = own
        with torch.inference_mode():
            pos = torch.arange(n, device="cuda").repeat(p)
            hidden = self.model(prompts.flatten(), pos, Prefill(g.k, g.v, prompt_slots.flatten(), p, n))
            temp = torch.full((p,), temperature, device="cuda")
            first, _ = sample(self.model.compute_logits(hidden.view(p, n, -1)[:, -1]), temp)
        out = torch.empty(rows, new, dtype=torch.long, device="cuda")
        out[:, 0] = first.repeat_interleave(rows_per_prompt)
        g.temperature[:rows] = temperature
        g.ids[:rows] = out[:, 0]
        g.pos[:rows] = n
        g.lens[:rows] = n + 1
        self.decode_start.record()
        for i in range(1, new):  # step i feeds token i-1 (position n+i-1, own slot i-1)
            g.slots[:rows] = own[:, i - 1]
            g.replay(rows)
            out[:, i] = g.tokens[:rows]
            g.ids[:rows] = g.tokens[:rows]
            g.pos[:rows] += 1
            g.lens[:rows] += 1
        self.decode_end.record()
        return out

    def decode_ms(self) -> float:
        """GPU time of the last generate's decode loop (after the prefill and first token)."""
        self.decode_end.synchronize()
        return self.decode_start.elapsed_time(self.decode_end)


def decode_bytes(weight_bytes: int, kv_token_bytes: int, rows: int, ctx0: int, steps: int) -> int:
    """Bytes a decode phase must read: all weights per step + each row's whole context per step."""
    ctx = sum(ctx0 + i for i in range(1, steps + 1))  # step i sees ctx0 + i tokens, its own included
    return steps * weight_bytes + rows * ctx * kv_token_bytes


def bench_ours(model, args, res):
    cfg = model.args
    kv_token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = [int(b) for b in args.batches.split(",") if b]
    ks = [int(k) for k in args.forks.split(",") if k]
    max_ctx = args.prompt + max(ks, default=1) * args.branch_len + 8
    free, total = torch.cuda.mem_get_info()
    slots = int((free - args.reserve_gb * 2**30) // kv_token_bytes)  # the rest of the GPU is the KV pool
    shape = (cfg.num_layers, slots, cfg.num_kv_heads, cfg.head_dim)
    k_cache = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    res["kv_capacity_tokens"] = slots
    res["kv_pool_gib"] = round(2 * k_cache.numel() * 2 / 2**30, 2)
    rows = sorted(set(batches + ks + [r * k for r, k in llm_cases(args)]))
    gemms = [x for x in args.gemm.split(",") if x]
    norms = [bool(int(x)) for x in str(args.norm_kernel).split(",") if x]
    tiles = [x for x in args.attn_tiles.split(",") if x]
    variants = [(gemm, norm, tile) for gemm in gemms for norm in norms for tile in tiles]

    def label(gemm, norm, tile):
        return gemm + (f"/norm{int(norm)}" if len(norms) > 1 else "") + (f"/attn-{tile}" if len(tiles) > 1 else "")
    res["compiled_decode"] = bool(args.compile)
    res["decode_by_gemm"] = {}
    for gemm, norm, tile in reversed(variants):  # the first (the run's default) last: its graphs serve the rest
        name = label(gemm, norm, tile)
        tuning = set_gemm(model, gemm, rows)
        if tuning:
            res[f"gemm_tuning_{name}"] = tuning
        set_norm(model, norm)
        set_attention_tiles(tile)
        g = DecodeGraphs(model, k_cache, v_cache, max_ctx, buckets=rows, compile=bool(args.compile))
        res[f"graph_capture_s_{name}"] = round(timed(lambda: g.capture()), 2)
        run = Runner(model, g, torch.randperm(slots, device="cuda"))  # scattered slots, as in a live pool
        res["decode_by_gemm"][name] = measure_decode(run, args, res, batches, weight_bytes, kv_token_bytes, name)
    res["decode"] = res["decode_by_gemm"][label(*variants[0])]
    V = cfg.vocab_size
    if args.profile and batches:
        for b in batches:
            res[f"profile_b{b}"] = profile_step(g, b, args.out)
    forks = []
    for k in ks:
        prompt = torch.randint(0, V, (1, args.prompt), device="cuda")
        t_par = timed(lambda: run.generate(prompt, k, args.branch_len, 1.0))
        t_seq = timed(lambda: run.generate(prompt, 1, k * args.branch_len, 1.0))
        forks.append(dict(k=k, branch_len=args.branch_len, parallel_s=t_par, sequential_s=t_seq,
                          speedup=t_seq / t_par))
        print(f"fork k={k}: {forks[-1]}", flush=True)
    res["fork"] = forks
    direct = []
    for r, k in llm_cases(args):  # the direct path on the shapes the LLM loop runs below
        prompts = torch.randint(0, V, (r, args.prompt), device="cuda")
        t = timed(lambda: run.generate(prompts, k, args.branch_len, 1.0))
        direct.append(dict(requests=r, k=k, rows=r * k, tokens=r * k * args.branch_len, s=t,
                           tok_s=r * k * args.branch_len / t))
        print(f"direct {r}x{k}: {direct[-1]}", flush=True)
    res["llm_direct"] = direct
    res["peak_gib_ours"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del g, run, k_cache, v_cache
    torch.cuda.empty_cache()


def set_norm(model, on: bool) -> None:
    """--norm-kernel: the engine's one-launch RMSNorm and residual add (engine/triton_norm.py), as `engine.LLM`
    sets it on its own fused model; it applies where the step is not compiled."""
    from engine.triton_norm import decode_rms_norm

    model.set_norm(decode_rms_norm if on and model.fused else None)


_ENGINE_TILES = (triton_attention.default_block_n, triton_attention.default_stages)


def set_attention_tiles(tile: str) -> None:
    """--attn-tiles: 'default' = the engine's rule per batch; 'NxS' = BLOCK_N slots per tile and S pipeline
    stages in every decode-attention launch (an A/B of the kernel's tiling inside the engine's step)."""
    if tile == "default":
        triton_attention.default_block_n, triton_attention.default_stages = _ENGINE_TILES
        return
    try:
        block_n, stages = (int(x) for x in tile.split("x"))
    except ValueError:
        raise SystemExit(f"--attn-tiles: {tile!r} is neither 'default' nor BLOCKxSTAGES (e.g. 64x3)") from None
    triton_attention.default_block_n = lambda rows, kv_heads: block_n
    triton_attention.default_stages = lambda rows, kv_heads: stages


def set_gemm(model, gemm: str, rows: list[int] = ()) -> list[dict]:
    """--gemm: 'triton' = the engine's decode GEMM (engine/decode_linear.py), 'torch' = F.linear (cuBLAS);
    a '-lt' suffix routes F.linear through cuBLASLt (torch's preferred_blas_library) instead of cuBLAS; a
    '-tuned' suffix times cuBLASLt's candidate algorithms for the products cuBLAS takes at `rows` and runs the
    fastest (`tune_decode_gemms`). Returns the tuning's measurements."""
    from engine import cublaslt, triton_gemm
    from engine.decode_linear import decode_linear, tune_decode_gemms

    model.set_gemm(decode_linear)  # the same traced graph either way: the choice is made inside the op
    base = gemm.removesuffix("-tuned").removesuffix("-lt")
    triton_gemm.MAX_ROWS = {"triton": triton_gemm.DEFAULT_MAX_ROWS, "torch": 0}[base]
    torch.backends.cuda.preferred_blas_library("cublaslt" if "-lt" in gemm else "cublas")
    cublaslt.clear()
    if not gemm.endswith("-tuned"):
        return []
    reports = tune_decode_gemms(model, list(rows))
    for r in reports:
        print(f"tuned M={r['rows']:4d} N={r['N']:6d} K={r['K']:5d}: F.linear {r['f_linear_us']:.1f} us, best "
              f"{r.get('best')} {r.get('best_us', float('nan')):.1f} us of {r['timed']}/{r['candidates']}, "
              f"heuristic's first {r.get('first_us', float('nan')):.1f} -> {r['choice'] or 'F.linear'}", flush=True)
    return reports


def measure_decode(run, args, res, batches, weight_bytes, kv_token_bytes, tag) -> list[dict]:
    """Decode tok/s and fraction of the roofline per batch size: `new` tokens after a `prompt`-token prefill,
    greedy; the decode loop is timed by CUDA events around it (e2e tok/s: the whole generate, prefill included)."""
    k_cache, v_cache = run.g.k, run.g.v
    rows = []
    for b in batches:
        prompts = torch.randint(0, run.model.args.vocab_size, (b, args.prompt), device="cuda")
        run.generate(prompts, 1, 8, 0.0)  # warm-up (prefill shapes)
        with torch.inference_mode():
            pos = torch.arange(args.prompt, device="cuda").repeat(b)
            slots = run.perm[:b * args.prompt].int()
            t_pre = timed(lambda: run.model(prompts.flatten(), pos, Prefill(k_cache, v_cache, slots, b, args.prompt)))
        with GpuClocks() as clocks:  # the loop runs for seconds: did it hold the clocks a short burst gets?
            t_all = timed(lambda: run.generate(prompts, 1, args.new, 0.0))
        t_dec = run.decode_ms() * 1e-3
        steps = args.new - 1
        nbytes = decode_bytes(weight_bytes, kv_token_bytes, b, args.prompt, steps)
        roof_t = nbytes / res["copy_bw"]
        rows.append(dict(batch=b, e2e_tok_s=b * args.new / t_all, decode_tok_s=b * steps / t_dec,
                         step_ms=1e3 * t_dec / steps, roofline_tok_s=b * steps / roof_t,
                         roofline_frac=roof_t / t_dec, prefill_s=t_pre, total_s=t_all,
                         step_ms_by_subtraction=1e3 * (t_all - t_pre) / steps, **clocks.summary()))
        print(f"ours ({tag} GEMMs) b={b}: {rows[-1]}", flush=True)
    return rows


def llm_cases(args) -> list[tuple[int, int]]:
    """--llm "1x4,16x4" -> [(requests, K plans), ...]"""
    return [tuple(int(x) for x in c.split("x")) for c in args.llm.split(",") if c]


def bench_llm(model, args, res, save=lambda: None):
    """The full engine loop: R requests, each a prompt of --prompt tokens ending in a guideline of K plans,
    so every request forks at once into K steps of up to --branch-len tokens (max_step_tokens), joins, and
    writes a short takeaway until its budget ends. Tokens/s = generated tokens (headers and forced tags
    included) / wall clock, prefill included; with CUDA graphs and, for comparison, eager decode steps."""
    import msgspec

    import engine.llm as llm_mod
    from engine.llm import LLM
    from engine.sampler import SamplingParams
    from npr_async.config import EngineConfig
    from npr_async.tokenizer import load_tokenizer

    tok = load_tokenizer()  # the bundled NPR tokenizer: its tag ids are < 417 < the model's vocab
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    L, takeaway = args.branch_len, 64
    # a pool that holds the largest case whole (the direct path never preempts)
    slots = args.llm_slots or max(r * (args.prompt + k * L + takeaway + 16) for r, k in llm_cases(args))
    res["llm_slots"] = slots
    out = []
    for graphs in (True, False) if args.llm_eager else (True,):
        llm = LLM(model, tok, EngineConfig(kv_slots=slots, max_batch_tokens=8192, max_plans=16,
                                           attention_backend="triton", cuda_graphs=graphs), device="cuda",
                  compile_graphs=bool(args.compile))
        warm = SamplingParams(temperature=1.0, seed=0, max_total_tokens=40, max_path_tokens=40,
                              max_step_tokens=8, max_plans=16)
        t_warm = timed(lambda: llm.generate([enc("<guideline><plan>1: a</plan><plan>2: b</plan></guideline>")] * 2,
                                            warm))  # graph capture (graphs on) and Triton warm-up
        for r, k in llm_cases(args):
            g = enc("<guideline>" + "".join(f"<plan>{i}: way {i}</plan>" for i in range(1, k + 1)) + "</guideline>")
            ids = enc("Question: ")[:1] * (args.prompt - len(g)) + g  # --prompt tokens, forks at once
            p = SamplingParams(temperature=1.0, seed=1, repetition_penalty=1.0, branch_repetition_penalty=1.0,
                               max_total_tokens=k * L + takeaway, max_path_tokens=L + takeaway + 8,
                               max_step_tokens=L, max_plans=16)
            # the case's eager steps (prefill, fork headers, joins) at their shapes: Triton compiles its
            # kernels per split count, seconds each, which would land in the timed run
            llm.generate([ids] * r, msgspec.structs.replace(p, max_step_tokens=8, max_total_tokens=8 * k + 16,
                                                             max_path_tokens=40))
            for ahead in [int(a) for a in args.step_ahead.split(",")] if graphs else [0]:
                llm_mod.STEP_AHEAD = bool(ahead)  # the engine loop's step ahead (engine/llm.py), off or on
                trajs = []
                t = timed(lambda: trajs.extend(llm.generate([ids] * r, p)))
                n = sum(x.num_tokens for x in trajs)
                out.append(dict(graphs=graphs, step_ahead=bool(ahead), requests=r, k=k, rows=r * k, s=t, tokens=n,
                                tok_s=n / t, forks=sum(x.num_forks for x in trajs),
                                branches=sum(x.num_branches for x in trajs),
                                finish={f: sum(x.finish_reason == f for x in trajs)
                                        for f in {x.finish_reason for x in trajs}},
                                warmup_s=t_warm, **llm.last_stats))
                print(f"llm {r}x{k}: {out[-1]}", flush=True)
                res["llm"] = out
                save()
        del llm
        torch.cuda.empty_cache()
    res["llm"] = out


def profile_step(g: DecodeGraphs, b: int, out_dir: str) -> list:
    """GPU time per kernel over 5 replays of the bucket-b step (contexts as at mid-generation)."""
    from torch.profiler import ProfilerActivity, profile

    g.lens[:b] = 256
    g.slots[:b] = g.table[:b, 255]
    g.replay(b)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g.replay(b)
        torch.cuda.synchronize()
    ev = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in ev)
    reps = 100  # back to back, unprofiled: against the summed kernel time, the gaps inside the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with GpuClocks() as clocks:
        start.record()
        for _ in range(reps):
            g.replay(b)
        end.record()
        end.synchronize()
    replay_ms = start.elapsed_time(end) / reps
    top = [dict(name=e.key[:90], ms_per_step=e.device_time_total / 5e3, calls_per_step=e.count / 5,
                share=e.device_time_total / total) for e in ev[:15]]
    print(f"profile b={b}: {total / 5e3:.2f} ms/step of GPU time; {replay_ms:.2f} ms per replay, {reps} back to back"
          f" {clocks.summary()}", flush=True)
    for t in top:
        print(f"  {t['share']:6.1%} {t['ms_per_step']:7.3f} ms {t['calls_per_step']:6.0f}x  {t['name']}", flush=True)
    return [dict(name="replay (back to back)", ms_per_step=replay_ms, **clocks.summary()), *top]


def bench_hf(model, args, res, save):
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sd = model.named_weight_targets()  # HF names (views of fused weights when fused)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        hf = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in QWEN3_4B.items() if k != "model_type"}))
    torch.set_default_dtype(torch.float32)
    hf.load_state_dict(sd, strict=False)  # the same weights as ours (the head is tied)
    hf.eval()
    del sd
    torch.cuda.reset_peak_memory_stats()
    compiled = {int(b) for b in args.hf_compile.split(",") if b}
    out = []
    for b in [int(x) for x in args.batches.split(",") if x]:
        ids = torch.randint(0, QWEN3_4B["vocab_size"], (b, args.prompt), device="cuda")
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, cache_implementation="static",
                  pad_token_id=0)

        def gen(n, c):
            return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, disable_compile=not c, **kw)
        timed(lambda: gen(4, False))  # warm-up
        t = timed(lambda: gen(args.new, False))
        out.append(dict(batch=b, e2e_tok_s=b * args.new / t, total_s=t))
        if b in compiled:  # transformers compiles the static-cache forward itself (reduce-overhead)
            out[-1]["compile_warmup_s"] = timed(lambda: gen(args.new, True))
            t = timed(lambda: gen(args.new, True))
            out[-1]["compiled_tok_s"] = b * args.new / t
        print(f"hf b={b}: {out[-1]}", flush=True)
        res["hf"] = out
        save()
    res["hf_version"] = transformers.__version__
    res["peak_gib_hf"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def table(res) -> str:
    hf = {r["batch"]: r for r in res.get("hf", [])}
    lines = [f"device: {res['device']}  copy bandwidth {res['copy_bw'] / 1e12:.2f} TB/s  date {res['date']}",
             "| batch | ours e2e tok/s | ours decode tok/s | step ms | roofline tok/s | % roofline "
             "| HF static eager | HF static compiled | ours / best HF: e2e, decode |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["decode"]:
        h = hf.get(r["batch"], {})
        best = max(h.get("e2e_tok_s", 0), h.get("compiled_tok_s", 0))  # HF's tok/s: its generate, prefill in
        ratio = f"{r['e2e_tok_s'] / best:.1f}x, {r['decode_tok_s'] / best:.1f}x" if best else "-"
        hc = f"{h['compiled_tok_s']:.0f}" if "compiled_tok_s" in h else "-"
        lines.append(f"| {r['batch']} | {r['e2e_tok_s']:.0f} | {r['decode_tok_s']:.0f} | {r['step_ms']:.2f} | "
                     f"{r['roofline_tok_s']:.0f} | {100 * r['roofline_frac']:.0f}% | {h.get('e2e_tok_s', 0):.0f} | "
                     f"{hc} | {ratio} |")
    lines += ["", "| K branches x L | parallel s | sequential s | speedup |", "|---|---|---|---|"]
    lines += [(f"| {f['k']} x {f['branch_len']} | {f['parallel_s']:.2f} | {f['sequential_s']:.2f} | "
               f"{f['speedup']:.2f}x |") for f in res["fork"]]
    direct = {(d["requests"], d["k"]): d for d in res.get("llm_direct", [])}
    if res.get("llm"):
        lines += ["", "| engine.LLM R requests x K plans (rows) | graphs | tokens | LLM s | LLM tok/s | direct tok/s "
                  "| LLM / direct |", "|---|---|---|---|---|---|---|"]
        for r in res["llm"]:
            d = direct.get((r["requests"], r["k"]), {})
            ratio = f"{r['tok_s'] / d['tok_s']:.0%}" if d else "-"
            graphs = ("on" + (", step ahead" if r.get("step_ahead") else "")) if r["graphs"] else "off"
            lines.append(f"| {r['requests']} x {r['k']} ({r['rows']}) | {graphs} | {r['tokens']} "
                         f"| {r['s']:.2f} | {r['tok_s']:.0f} | {d.get('tok_s', 0):.0f} | {ratio} |")
    lines.append(f"\npeak GPU memory: ours {res['peak_gib_ours']} GiB (KV pool {res['kv_pool_gib']} GiB = "
                 f"{res['kv_capacity_tokens']} tokens); HF {res.get('peak_gib_hf', '-')} GiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--forks", default="2,4,8")
    ap.add_argument("--branch-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=QWEN3_4B["num_hidden_layers"], help="fewer for a smoke run")
    ap.add_argument("--reserve-gb", type=float, default=12.0, help="GPU memory left out of the KV pool")
    ap.add_argument("--hf", type=int, default=1, help="0: skip the HF comparison")
    ap.add_argument("--compile", type=int, default=0,
                    help="1: torch.compile the decode step inside the graphs (the engine's default is not to)")
    ap.add_argument("--norm-kernel", default="1",
                    help="comma-separated: 1 = RMSNorm and the residual add before it in one Triton launch where the "
                         "step is not compiled (engine/triton_norm.py, as the engine), 0 = the model's torch code; "
                         "each value with each --gemm (0,1: an A/B in one run)")
    ap.add_argument("--attn-tiles", default="default", help="comma-separated decode-attention tilings: default (the "
                    "engine's rule) or BLOCKxSTAGES, e.g. 64x5; each with each --gemm and --norm-kernel")
    ap.add_argument("--profile", type=int, default=0, help="1: per-kernel GPU time of one step")
    ap.add_argument("--hf-compile", default="", help="batch sizes whose HF generate is torch.compiled")
    ap.add_argument("--gemm", default="triton-tuned", help="decode GEMMs: triton-tuned (the engine's default: "
                    "EngineConfig.tune_gemms), triton (Triton for few rows, cuBLAS's own picks else), torch (cuBLAS); "
                    "-lt appended (triton-lt, torch-lt): cuBLASLt where cuBLAS would run; -tuned appended "
                    "(triton-tuned): cuBLASLt's algorithms timed per product and row count, the fastest run; a list "
                    "measures the decode table once per entry, the first is used for everything else")
    ap.add_argument("--fuse", type=int, default=1, help="fused q/k/v and gate/up GEMMs (engine inference)")
    ap.add_argument("--llm", default="1x4,16x4", help="engine.LLM loop cases RxK ('' skips)")
    ap.add_argument("--llm-eager", type=int, default=1, help="0: the engine.LLM cases with CUDA graphs only")
    ap.add_argument("--step-ahead", default="1", help="engine.llm.STEP_AHEAD values for the engine.LLM cases "
                    "with graphs, e.g. 0,1 (each case runs once per value)")
    ap.add_argument("--llm-slots", type=int, default=0, help="KV slots of the engine.LLM runs (0: the largest "
                    "case whole, no preemption)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args(argv)
    QWEN3_4B["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    res = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), args=vars(args),
               torch=torch.__version__)
    res["copy_bw"] = copy_bandwidth()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = CausalLM(ModelArgs.from_hf_config(QWEN3_4B)).eval()
    torch.set_default_dtype(torch.float32)
    if args.fuse:
        model.fuse_projections()
    res["fused"] = bool(args.fuse)
    res["params"] = sum(p.numel() for p in model.parameters())
    torch.cuda.reset_peak_memory_stats()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    save = lambda: (Path(args.out) / "engine.json").write_text(json.dumps(res, indent=1))  # noqa: E731
    bench_ours(model, args, res)
    save()  # partial results survive a later failure or timeout
    if args.llm:
        bench_llm(model, args, res, save)
        save()
    if args.hf:
        bench_hf(model, args, res, save)
    save()
    text = table(res)
    (Path(args.out) / "engine.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
