"""The decode forward with the residual adds and RMSNorms inside the GEMMs (an experiment: `ENABLED`).

In the compiled decode step each layer's two "x = x + proj(...); h = RMSNorm(x)" compile to one Inductor kernel
each, between two GEMMs: ~2.5 us of launch and ramp apiece at any row count (0.19 ms per step at 1 and 64
rows on an H200, BENCHMARKS.md). Here the GEMM that ends a residual branch (o, down) adds the residual in its
epilogue and leaves the new x's sums of squares per 16 columns; the next GEMM (gate/up, the next layer's q/k/v,
the LM head) normalises its input rows in its prologue from those sums (engine/triton_gemm.py RESIDUAL / NORM).
Where cuBLAS takes a product instead (`triton_gemm.takes`), one row-wise kernel does the add and the norm
(engine/triton_norm.py), as Inductor did. Values are the model's: the add and the norm round as its torch code
does (only the order of the sum of squares differs). Layer 0's input norm stays the model's.
Off the GPU the ops are the model's torch code, so CPU tests compare `forward` with the model bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ENABLED = False


def _ssq_groups(x: torch.Tensor) -> torch.Tensor:
    m, n = x.shape
    return F.pad(x.float() ** 2, (0, -n % 16)).view(m, -1, 16).sum(-1)


def _kernels(x: torch.Tensor, weight: torch.Tensor) -> bool:
    from engine.decode_linear import _triton_capable

    return _triton_capable(x, weight)


@torch.library.custom_op("npr::residual_linear", mutates_args=())
def residual_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                    g: torch.Tensor, eps: float, n_next: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_new = residual + x @ weight^T (+ bias), h = RMSNorm(x_new) * g, ssq = x_new's sums of squares per 16
    columns): of h and ssq only what the next product of n_next columns needs is written (its kernel reads ssq
    in a prologue, cuBLAS reads h)."""
    m, n = x.shape[0], weight.shape[0]
    if not _kernels(x, weight):
        from engine.model import rms_norm

        new = residual + F.linear(x, weight, bias)
        return new, rms_norm(new, g, eps), _ssq_groups(new)
    from engine import triton_gemm
    from engine.triton_norm import residual_norm

    h = torch.empty_like(residual)
    ssq = torch.empty(m, -(-n // 16), dtype=torch.float32, device=x.device)
    next_kernel = triton_gemm.takes(m, n_next)
    if triton_gemm.takes(m, n):
        new = triton_gemm.skinny_linear(x, weight, bias, residual=residual.contiguous(), ssq_out=ssq)
        if not next_kernel:
            residual_norm(new, None, g, eps, new, h, ssq, want_h=True, want_ssq=False)
    else:
        new = torch.empty_like(residual)
        residual_norm(F.linear(x, weight, bias), residual.contiguous(), g, eps, new, h, ssq, want_h=not next_kernel,
                      want_ssq=next_kernel)
    return new, h, ssq


@residual_linear.register_fake
def _(x, weight, bias, residual, g, eps, n_next):
    m, n = x.shape[0], weight.shape[0]
    return residual.new_empty(m, n), residual.new_empty(m, n), x.new_empty(m, -(-n // 16), dtype=torch.float32)


@torch.library.custom_op("npr::norm_linear", mutates_args=())
def norm_linear(x: torch.Tensor, h: torch.Tensor, ssq: torch.Tensor, g: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
    """RMSNorm(x) * g @ weight^T (+ bias) (gated: SwiGLU of the fused gate/up product), from `residual_linear`'s
    outputs: the kernel normalises x in its prologue from ssq where it takes the product, cuBLAS reads h."""
    from engine.decode_linear import _reference_swiglu

    if _kernels(x, weight):
        from engine import triton_gemm

        if triton_gemm.takes(x.shape[0], weight.shape[0]):
            return triton_gemm.skinny_linear(x, weight, bias, gated=gated, norm=(ssq, g, eps))
        return triton_gemm.silu_mul(F.linear(h, weight, bias)) if gated else F.linear(h, weight, bias)
    return _reference_swiglu(h, weight, bias) if gated else F.linear(h, weight, bias)


@norm_linear.register_fake
def _(x, h, ssq, g, eps, weight, bias, gated):
    return x.new_empty(x.shape[0], weight.shape[0] // (2 if gated else 1))


def applies(model) -> bool:
    """The experiment is on and the model is an engine model it can run: fused projections, the decode GEMM,
    the plain logits (a wrapper that changes them keeps the model's own forward)."""
    from engine.decode_linear import decode_linear
    from engine.model import CausalLM

    return (ENABLED and type(model).compute_logits is CausalLM.compute_logits and model.fused
            and model.head_gemm is decode_linear)


def forward(model, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
    """The LM head's product in the model's dtype (as `CausalLM.head_logits(model(...))`), norms fused."""
    m = model.model
    layers = m.layers
    x = m.embed_tokens(input_ids)
    rope = m.rotary_emb.cos_sin(positions, x.dtype)
    t = x.shape[0]
    res, h, ssq = x, layers[0].input_layernorm(x), None
    for i, layer in enumerate(layers):
        a, mlp, ln1, ln2 = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
        if i == 0:
            qkv = a.qkv_proj(h)
        else:
            qkv = norm_linear(res, h, ssq, ln1.weight, ln1.eps, a.qkv_proj.weight, a.qkv_proj.bias, False)
        o = attn(a.layer_idx, *a.split_qkv(qkv, rope))
        up = mlp.gate_up_proj.weight
        res, h, ssq = residual_linear(o.reshape(t, -1), a.o_proj.weight, a.o_proj.bias, res, ln2.weight, ln2.eps,
                                      up.shape[0])
        act = norm_linear(res, h, ssq, ln2.weight, ln2.eps, up, mlp.gate_up_proj.bias, True)
        nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else m.norm
        n_next = layers[i + 1].self_attn.qkv_proj.weight.shape[0] if i + 1 < len(layers) else model.args.vocab_size
        res, h, ssq = residual_linear(act, mlp.down_proj.weight, mlp.down_proj.bias, res, nxt.weight, nxt.eps, n_next)
    return norm_linear(res, h, ssq, m.norm.weight, m.norm.eps, model.head_weight, None, False)
