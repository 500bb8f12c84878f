"""Compile ahead the Triton specialisations an eager engine step can launch, so none compiles mid-call.

Triton compiles a kernel once per launch configuration (constexprs) and argument properties (an int equal to 1
or divisible by 16). CUDA-graph capture compiles what a decode step launches at the bucketed batch sizes; an eager
step (prompts, and the forced fork / join headers while graphs are on) launches the same GEMM and the CSR form of
the attention kernel at any row count, and a row count of a class the buckets did not cover compiled on the host
in the middle of a rollout call: 2 compiles, 0.46 s, in a generator's third call on a fresh H200 host
(`engine/jit_compiles.py`'s count; BENCHMARKS.md, session 15). `compile_eager_kernels` launches one row count of
each class on scratch inputs when the engine sets up (the KV cache is read, never written; outputs are dropped).
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
def compile_eager_kernels(model, k_cache: torch.Tensor, v_cache: torch.Tensor, max_rows: int, attention: bool) -> int:
    """Launch each Triton specialisation an eager step of `model` can need: the skinny GEMM of every product the
    engine routes to it, and with `attention` the CSR decode-attention launch over one layer's caches [S, Hkv, D]
    up to max_rows query rows. Returns the launches made."""
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
