"""Learner benchmark: tokens/s and MFU of one PAPO step in several configurations, plus attention alone.

    python3 bench/learner.py --out $OUT/learner.json            # Qwen3-4B shape, 16k tokens, 4-branch trees, GPU
    python3 bench/learner.py --tiny --out /tmp/learner.json     # CPU smoke run of the same code

A step = streamed accumulation of one group of tree trajectories (prompt, guideline, `--branches` parallel
steps, takeaway) + gradient scaling, clipping and AdamW, with fp32 master weights and AdamW state. MFU counts
6 · matmul params · tokens + 12 · layers · heads · head_dim · visible (q, k) pairs, not the recompute of
checkpointed layers (`hfu` counts it). Attention alone: one 16k-token layer, flex BlockMask vs a dense mask.
`--variants`: a comma-separated list, each `+`-joined from flex|dense (attention: the trainer's own, a BlockMask
on GPU, or one L×L mask), eager|compile, bf16|autocast|fp32 (learner.mixed_precision bf16|autocast|off) and
ckpt=all|none|K (checkpoint the first K layers); omitted: flex, compile and bf16 on CUDA, ckpt=all.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attention import MaskedAttention  # noqa: E402
from engine.model import CausalLM, ModelArgs  # noqa: E402
from npr_async.config import LearnerConfig  # noqa: E402
from npr_async.messages import Trajectory  # noqa: E402
from npr_async.training import trainer as trainer_mod  # noqa: E402
from npr_async.training.forward import compiled_versions  # noqa: E402
from npr_async.training.packing import collate, Sample  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def model_args(tiny: bool) -> ModelArgs:
    from npr_async.models import PRESETS

    p = dict(PRESETS["tiny" if tiny else "qwen3-4b-shape"])
    cfg = {"model_type": "qwen3", "vocab_size": p.pop("vocab_size", 448), "num_attention_heads": p.pop("num_attention_heads"),
           "num_hidden_layers": p.pop("num_hidden_layers"), "rope_theta": p.pop("rope_theta"), **p}
    return ModelArgs.from_hf_config(cfg)


def build_model(args: ModelArgs, device) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(args)
    model = model.to_empty(device=device).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    return model


def tree_trajectory(n_tokens: int, branches: int, vocab: int, seed: int) -> Trajectory:
    """prompt | guideline | `branches` sibling steps | takeaway, sized to n_tokens (NPR positions)."""
    rng = np.random.default_rng(seed)
    prompt, guide = n_tokens // 16, n_tokens // 16
    join = n_tokens // 8
    step = (n_tokens - prompt - guide - join) // branches
    join = n_tokens - prompt - guide - step * branches
    trunk = prompt + guide
    segs = np.concatenate([np.zeros(trunk, np.int32)] + [np.full(step, k + 1, np.int32) for k in range(branches)]
                          + [np.full(join, branches + 1, np.int32)])
    pos = np.concatenate([np.arange(trunk)] + [trunk + np.arange(step)] * branches + [trunk + step + np.arange(join)])
    parents = [[]] + [[0]] * branches + [list(range(branches + 1))]
    sampled = np.arange(n_tokens) >= prompt
    return Trajectory.build(token_ids=rng.integers(0, vocab, n_tokens), positions=pos, segment_ids=segs,
                            parents=parents, logprobs=np.where(sampled, -1.0, np.nan), sampled=sampled,
                            prompt_len=prompt, finish_reason="stop", prompt_id="bench")


def visible_pairs(trajs) -> int:
    mb = collate([Sample.from_trajectory(t) for t in trajs])
    return int(sum(int(mb.dense_mask(a, b).sum()) for a, b in mb.bounds))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def dense_attention(mb, device):  # NPR's way: one dense mask over the whole pack
    return MaskedAttention(mb.to(device).dense_mask())


_NO_PROFILE = contextlib.nullcontext()


def _profiler(args, device, last: bool):
    """torch.profiler around the last timed step when --profile is set (its time then includes the profiler)."""
    if not (args.profile and last and device.type == "cuda"):
        return _NO_PROFILE
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])


def parse_variant(spec: str, device) -> dict:
    """`flex+compile+bf16+ckpt=8` -> the variant's attention and LearnerConfig overrides."""
    cuda = device.type == "cuda"
    v = {"attn": "flex", "compile": cuda, "precision": "bf16" if cuda else "fp32", "ckpt": "all"}
    for part in filter(None, spec.split("+")):
        if part in ("flex", "dense"):
            v["attn"] = part
        elif part in ("eager", "compile"):
            v["compile"] = part == "compile"
        elif part in PRECISION:
            v["precision"] = part
        elif part.startswith("ckpt=") and (part[5:] in ("all", "none") or part[5:].isdigit()):
            v["ckpt"] = part[5:]
        else:
            raise SystemExit(f"--variants {spec!r}: unknown part {part!r} (flex|dense, eager|compile, "
                             f"bf16|autocast|fp32, ckpt=all|none|K)")
    return v


PRECISION = {"bf16": "bf16", "autocast": "autocast", "fp32": "off"}


def learner_config(args, v: dict) -> LearnerConfig:
    ckpt = v["ckpt"]
    return LearnerConfig(loss="papo", lr=1e-7, micro_batch_tokens=args.tokens, compile=v["compile"],
                         mixed_precision=PRECISION[v["precision"]], activation_checkpointing=ckpt != "none",
                         checkpoint_layers=-1 if ckpt in ("all", "none") else int(ckpt))


def papo_step(args, margs, trajs, v: dict, device) -> dict:
    orig = trainer_mod.attention_for
    if v["attn"] == "dense":
        trainer_mod.attention_for = dense_attention
    model = tr = None
    before = compiled_versions()
    out = {}
    try:
        model = build_model(margs, device)
        tr = trainer_mod.Trainer(model, learner_config(args, v))
        out["checkpointed_layers"] = len(tr.forward.checkpoint_layers)
        rewards = [1.0 if i % 2 == 0 else -1.0 for i in range(len(trajs))]
        times = []
        for i in range(args.warmup + args.steps):
            if i == args.warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            prof = _profiler(args, device, last=i == args.warmup + args.steps - 1)
            with prof:
                tr.accumulate(trajs, rewards)
                tr.finish_step()
                sync(device)
            if prof is not _NO_PROFILE:
                out["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                                           max_name_column_width=60)
            (times.append if i >= args.warmup else out.setdefault("warmup_s", []).append)(time.perf_counter() - t0)
        out.update(step_s=float(np.median(times)), steps=len(times))
        if device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    except torch.cuda.OutOfMemoryError as e:
        out["error"] = f"OOM: {str(e)[:200]}"
    finally:
        trainer_mod.attention_for = orig
        del tr, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    after = compiled_versions()
    out["new_compiled_versions"] = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    return out


def flex_options(spec: str) -> dict[str, dict]:
    """--flex-options "BLOCK_M=64,BLOCK_N=64;num_stages=2" -> {"flex[BLOCK_M=64,BLOCK_N=64]": {...}, ...}."""
    out = {}
    for case in filter(None, spec.split(";")):
        out[f"flex[{case}]"] = {k.strip(): option_value(v.strip()) for k, v in (p.split("=", 1) for p in case.split(","))}
    return out


def option_value(text: str) -> int | bool:
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        raise SystemExit(f"--flex-options: {text!r} is neither an integer nor True/False") from None


def attention_only(args, margs, trajs, device) -> dict:
    """One layer's attention forward+backward at the full pack: flex BlockMask (defaults, then each of
    --flex-options) vs SDPA + dense bool mask. The mask is built once, outside the timed loop, as the trainer
    builds it once per micro-batch for every layer; its build time is reported apart (`mask_s`)."""
    from npr_async.training.flex import FlexAttention, build_block_mask

    mb = collate([Sample.from_trajectory(t) for t in trajs]).to(device)
    t, hq, hkv, dh = mb.num_tokens, margs.num_heads, margs.num_kv_heads, margs.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = {"flex": None, **flex_options(args.flex_options), "dense": None} if device.type == "cuda" else {"dense": None}
    res = {}
    for name, opts in cases.items():
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            q = torch.randn(t, hq, dh, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(t, hkv, dh, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(t, hkv, dh, device=device, dtype=dtype, requires_grad=True)
            build = (lambda: build_block_mask(mb.segment_ids, mb.ancestors)) if name != "dense" else mb.dense_mask
            build()  # warm-up (the compiled mask construction)
            sync(device)
            t0 = time.perf_counter()
            mask = build()
            sync(device)
            mask_s = time.perf_counter() - t0
            attn = FlexAttention(mask, kernel_options=opts) if name != "dense" else MaskedAttention(mask)
            times = []
            for i in range(args.warmup + args.steps):
                sync(device)
                t0 = time.perf_counter()
                attn(0, q, k, v).float().sum().backward()
                sync(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            res[name] = {"fwd_bwd_s": float(np.median(times)), "mask_s": mask_s, "kernel_options": opts}
            if device.type == "cuda":  # peak from before q/k/v; `work`: above what both need (q/k/v,
                # their grads, the output and its grad), i.e. the mask and the kernels' workspace
                res[name]["peak_mem_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                io = 2 * (q.numel() + k.numel() + v.numel() + q.numel()) * q.element_size()
                res[name]["work_mem_gb"] = res[name]["peak_mem_gb"] - io / 2**30
            print(f"attention_only {name}: {json.dumps(res[name])}", flush=True)
            del q, k, v, attn, mask
        except torch.cuda.OutOfMemoryError as e:
            res[name] = {"error": f"OOM: {str(e)[:200]}"}
        except Exception as e:  # a flex tile configuration the GPU cannot run: record it, go on
            if name in ("flex", "dense"):
                raise
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    if "flex" in res and "dense" in res and "error" not in res["flex"] and "error" not in res["dense"]:
        res["dense_over_flex_time"] = res["dense"]["fwd_bwd_s"] / res["flex"]["fwd_bwd_s"]
        res["dense_over_flex_mem"] = res["dense"]["peak_mem_gb"] / max(res["flex"]["peak_mem_gb"], 1e-9)
        res["dense_over_flex_work_mem"] = res["dense"]["work_mem_gb"] / max(res["flex"]["work_mem_gb"], 1e-9)
        fastest = min((r for r in res.values() if isinstance(r, dict) and "fwd_bwd_s" in r and r is not res["dense"]),
                      key=lambda r: r["fwd_bwd_s"])
        res["dense_over_best_flex_time"] = res["dense"]["fwd_bwd_s"] / fastest["fwd_bwd_s"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny model, 1k tokens, CPU (smoke run)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (one micro-batch)")
    ap.add_argument("--traj-tokens", type=int, default=8192, help="tokens per trajectory")
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", default="", help="configurations to compare (see the module docstring)")
    ap.add_argument("--attn", default="flex,dense", help="without --variants: one variant per attention")
    ap.add_argument("--no-checkpointing", action="store_true", help="without --variants: ckpt=none")
    ap.add_argument("--no-attention-only", action="store_true", help="skip the attention-only comparison")
    ap.add_argument("--flex-options", default="", help="attention-only: flex kernel_options cases to add, e.g. "
                    "'BLOCK_M=64,BLOCK_N=64;num_stages=2' (';' between cases)")
    ap.add_argument("--profile", action="store_true",
                    help="top GPU kernels of each variant's last step, saved next to --out")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak (default: from the GPU name)")
    args = ap.parse_args()
    if args.tiny:
        args.tokens, args.traj_tokens, args.steps, args.warmup = 1024, 512, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    margs = model_args(args.tiny)
    trajs = [tree_trajectory(args.traj_tokens, args.branches, margs.vocab_size, s)
             for s in range(args.tokens // args.traj_tokens)]
    tokens = sum(len(t) for t in trajs)
    layer_params = margs.hidden_size * margs.head_dim * (2 * margs.num_heads + 2 * margs.num_kv_heads) \
        + 3 * margs.hidden_size * margs.intermediate_size
    matmul_params = margs.num_layers * layer_params + margs.hidden_size * margs.vocab_size
    pairs = visible_pairs(trajs)
    attn_flops = 4 * margs.num_heads * margs.head_dim * pairs  # one layer's attention forward
    flops = 6 * matmul_params * tokens + 3 * margs.num_layers * attn_flops
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 or next((v for k, v in PEAK_BF16.items() if k in gpu), 0.0)
    result = {"device": gpu, "torch": torch.__version__, "tokens": tokens, "trajectories": len(trajs),
              "branches": args.branches, "model_flops_per_step": flops, "visible_pairs": pairs, "steps": {}}
    specs = [s for s in args.variants.split(",") if s] or [
        f"{a}{'+ckpt=none' if args.no_checkpointing else ''}" for a in args.attn.split(",") if a]
    for spec in specs:
        v = parse_variant(spec, device)
        r = {"variant": v, **papo_step(args, margs, trajs, v, device)}
        if "step_s" in r:
            r["tokens_per_s"] = tokens / r["step_s"]
            if peak:  # hfu also counts the forward recomputed in checkpointed layers
                r["mfu"] = flops / r["step_s"] / peak
                recompute = r["checkpointed_layers"] * (2 * layer_params * tokens + attn_flops)
                r["hfu"] = (flops + recompute) / r["step_s"] / peak
        profile = r.pop("profile", None)
        if profile:  # next to --out, one file per variant, the variant on the first line
            path = Path(args.out).with_name(f"{Path(args.out).stem}_profile_{len(result['steps'])}.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{spec}\n{profile}\n")
            print(f"{spec}: profile in {path}", flush=True)
        result["steps"][spec] = r
        print(spec, json.dumps(r), flush=True)
    if not args.no_attention_only:
        result["attention_only"] = attention_only(args, margs, trajs, device)
        print("attention_only", json.dumps(result["attention_only"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
