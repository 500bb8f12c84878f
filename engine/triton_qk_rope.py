"""Triton kernel behind engine/qk_rope.py: per token, RMSNorm of every q/k head (optional) then RoPE.

Rounding follows the model's torch code: the normalised vector is rounded to the model's dtype before the
weight multiplies it (as `rms_norm`), the weighted value rounded again, and the rotation computed in float32
and rounded once (as Inductor compiles `apply_rope`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(x_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, out_ptr, H, NQ, stride_xt, stride_xh, stride_ct,
                         stride_st, eps, NORM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    hm = (h < H)[:, None]
    x_off = t.to(tl.int64) * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(x_ptr + x_off, mask=hm, other=0.0)  # each head's two RoPE halves
    x2 = tl.load(x_ptr + x_off + HALF, mask=hm, other=0.0)
    dtype = x1.dtype
    if NORM:
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        rstd = tl.rsqrt((tl.sum(a1 * a1, 1) + tl.sum(a2 * a2, 1)) / (2 * HALF) + eps)[:, None]
        is_q = (h < NQ)[:, None]  # heads [0, NQ) are q heads (q_norm's weight), the rest k heads
        w1 = tl.where(is_q, tl.load(wq_ptr + d)[None, :], tl.load(wk_ptr + d)[None, :]).to(tl.float32)
        w2 = tl.where(is_q, tl.load(wq_ptr + HALF + d)[None, :], tl.load(wk_ptr + HALF + d)[None, :]).to(tl.float32)
        x1 = (w1 * (a1 * rstd).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (a2 * rstd).to(dtype).to(tl.float32)).to(dtype)
    c1 = tl.load(cos_ptr + t * stride_ct + d).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + d).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * stride_st + d).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * stride_st + HALF + d).to(tl.float32)[None, :]
    y1, y2 = x1.to(tl.float32), x2.to(tl.float32)
    o_off = (t.to(tl.int64) * H + h[:, None]) * (2 * HALF) + d[None, :]
    tl.store(out_ptr + o_off, (y1 * c1 - y2 * s1).to(dtype), mask=hm)
    tl.store(out_ptr + o_off + HALF, (y2 * c2 + y1 * s2).to(dtype), mask=hm)


def qk_norm_rope_cuda(qk: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                      num_q: int, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qk [T, H, D] with D a power of two and unit stride along D (engine/qk_rope.py checks)."""
    t, h, d = qk.shape
    cos, sin = cos.reshape(t, d), sin.reshape(t, d)
    if cos.stride(1) != 1 or sin.stride(1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    norm = q_weight is not None
    out = torch.empty(t, h, d, dtype=qk.dtype, device=qk.device)
    _qk_norm_rope_kernel[(t,)](qk, q_weight if norm else qk, k_weight if norm else qk, cos, sin, out, h, num_q,
                               qk.stride(0), qk.stride(1), cos.stride(0), sin.stride(0), eps, NORM=norm,
                               HALF=d // 2, BLOCK_H=triton.next_power_of_2(h), num_warps=4)
    return out
