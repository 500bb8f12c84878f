"""Compile ahead the Triton specialisations an eager engine step can launch, so none compiles mid-call.

Triton compiles a kernel once per launch configuration (constexprs) and argument properties (an int equal to 1
or divisible by 16, a pointer's 16-byte alignment). CUDA-graph capture compiles what a decode step launches at the
bucketed batch sizes; an eager step (prompts, and the forced fork / join headers while graphs are on) launches the
same GEMM and the CSR form of the attention kernel at any row count, and the engine loop's sampler draws outside
the graphs at every step's exact row count. A row count of a class not yet seen compiled on the host in the middle
of a rollout call: on a fresh H200 host the sampler's two kernels, 4 compiles (1.33 s) in the first call, 2 and 4
in later ones (`engine/jit_compiles.py`'s count; BENCHMARKS.md, sessions 15-16). `compile_eager_kernels` launches
one row count of each class on scratch inputs when the engine sets up (the KV cache is read, never written;
outputs are dropped); `engine/triton_sampling.split` keeps the sampler's classes to two.
"""
from __future__ import annotations

import torch


def representatives(classify, limit: int) -> list[int]:
    """The smallest n in 1..limit of each distinct classify(n), in order: one launch per specialisation."""
    seen, out = set(), []
    for n in range(1, limit + 1):
        c = classify(n)
        if c not in seen:
            seen.add(c)
            out.append(n)
    return out


def int_class(n: int) -> str:
    """How Triton specialises an int argument: equal to 1, divisible by 16, or neither."""
    return "1" if n == 1 else "16" if n % 16 == 0 else "-"


def attention_row_counts(max_rows: int, num_kv_heads: int, device: torch.device) -> list[int]:
    """Row counts of the CSR decode-attention launch that cover every launch configuration up to max_rows."""
    from engine.triton_attention import default_block_n, default_splits, default_stages

    return representatives(lambda r: (default_splits(r, num_kv_heads, device), default_block_n(r, num_kv_heads),
                                      default_stages(r, num_kv_heads)), max_rows)


def sampler_row_counts(vocab: int, max_rows: int) -> list[int]:
    """Row counts of the engine sampler's fused launch (`inverse_cdf_sample`) that cover its launch configs."""
    from engine.triton_sampling import BLOCK, split

    return representatives(lambda b: split(vocab, b, BLOCK), max_rows)


def gemm_row_counts(n: int, k: int, sms: int) -> list[int]:
    """Row counts of the skinny GEMM's launches of an [n, k] weight (those `takes` gives it) that cover every
    specialisation: the launch config and the row count's int class."""
    from engine import triton_gemm

    limit = max(triton_gemm.MAX_ROWS, triton_gemm.WIDE_MAX_ROWS)
    return [m for m in representatives(lambda m: (triton_gemm.takes(m, n), int_class(m),
                                                  tuple(sorted(triton_gemm.config(m, n, k, sms).items()))), limit)
            if triton_gemm.takes(m, n)]


def gemm_products(model) -> list[tuple[torch.Tensor, torch.Tensor | None, bool]]:
    """(weight, bias, gated) of each distinct product the engine's GEMM takes in `model`: one layer's
    projections (the others have the same shapes), the fused gate/up as SwiGLU where the MLP has it, the head."""
    from engine.model import MLP, Linear

    found: dict[tuple, tuple] = {}
    gated = {id(m.gate_up_proj) for m in model.modules() if isinstance(m, MLP) and m.swiglu is not None}
    for mod in model.modules():
        if id(mod) in gated:  # its product goes through the MLP's SwiGLU, never through its own gemm
            w, b = mod.weight, mod.bias
            found.setdefault((tuple(w.shape), b is None, True), (w, b, True))
        elif isinstance(mod, Linear) and mod.gemm is not None:
            found.setdefault((tuple(mod.weight.shape), mod.bias is None, False), (mod.weight, mod.bias, False))
    if getattr(model, "head_gemm", None) is not None:
        w = model.head_weight
        found.setdefault((tuple(w.shape), True, False), (w, None, False))
    return list(found.values())


@torch.inference_mode()
def compile_eager_kernels(model, k_cache: torch.Tensor, v_cache: torch.Tensor, max_rows: int, attention: bool,
                          sample: bool = False) -> int:
    """Launch each Triton specialisation an eager step of `model` can need: the skinny GEMM of every product the
    engine routes to it, with `attention` the CSR decode-attention launch over one layer's caches [S, Hkv, D], and
    with `sample` the sampler's fused draw (every step's, graph steps' too), up to max_rows rows. Returns the
    launches made."""
    from engine.decode_linear import _triton_capable

    dev, launches = k_cache.device, 0
    if attention:
        from engine.triton_attention import decode_attention

        a = model.args
        for r in attention_row_counts(max_rows, a.num_kv_heads, dev):
            q = torch.zeros(r, a.num_heads, a.head_dim, dtype=k_cache.dtype, device=dev)
            kv_new = torch.zeros(r, a.num_kv_heads, a.head_dim, dtype=k_cache.dtype, device=dev)
            indptr = torch.arange(r + 1, dtype=torch.int32, device=dev)
            indices = torch.zeros(r, dtype=torch.int32, device=dev)  # every row sees slot 0
            nowhere = torch.full((r,), -1, dtype=torch.int32, device=dev)  # the fused write skips slots < 0
            for new_kv in (None, (kv_new, kv_new, nowhere)):
                decode_attention(q, k_cache, v_cache, indptr=indptr, indices=indices, new_kv=new_kv)
                launches += 1
    if sample:
        from engine.triton_sampling import inverse_cdf_sample

        reps = sampler_row_counts(model.args.vocab_size, max_rows)
        x = torch.zeros(reps[-1], model.args.vocab_size, dtype=torch.float32, device=dev)  # as compute_logits'
        for b in reps:
            ones = torch.ones(b, dtype=torch.float32, device=dev)
            inverse_cdf_sample(x[:b], ones, ones, torch.zeros_like(ones))  # hot rows, temperature 1
            launches += 2
        del x
    products = gemm_products(model)
    if products:
        from engine import triton_gemm

        sms = triton_gemm._sm_count(dev.index or 0)  # the count skinny_linear's launch config reads
    for w, b, gated in products:
        n, k = w.shape
        for m in gemm_row_counts(n, k, sms):
            x = torch.zeros(m, k, dtype=w.dtype, device=w.device)
            if _triton_capable(x, w):
                triton_gemm.skinny_linear(x, w, b, gated=gated)
                launches += 1
    return launches
