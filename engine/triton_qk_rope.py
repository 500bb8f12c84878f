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
def normed_rotated(vec_ptrs, mask, wq_ptr, wk_ptr, is_q, cos_ptr, sin_ptr, eps, NORM: tl.constexpr, D: tl.constexpr):
    """Head vectors starting at `vec_ptrs` [M, 1] (unit stride along D), RMSNorm'd (NORM; rows where `is_q` [M, 1]
    with q_norm's weight, the others with k_norm's) then rotated by the cos / sin [D] of their token, in their
    dtype. Returned as the two RoPE halves [M, D/2] (d < D/2, d >= D/2): each half is loaded, and can be stored,
    as contiguous vectors (reading every element with its partner at (d + D/2) % D compiled to one scalar load
    per element, 254 registers and 16 KB of shared memory for the q/k kernel). `joined` makes the [M, D] that
    `tl.dot` takes: decode attention calls this on its q heads and new k (the fused prologue), the kernel below
    on all of a token's heads, so both round identically."""
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)[None, :]
    x1 = tl.load(vec_ptrs + d, mask=mask, other=0.0)
    x2 = tl.load(vec_ptrs + HALF + d, mask=mask, other=0.0)
    dtype = x1.dtype
    if NORM:
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        rstd = tl.rsqrt((tl.sum(a1 * a1, 1) + tl.sum(a2 * a2, 1)) / D + eps)[:, None]
        w1 = tl.where(is_q, tl.load(wq_ptr + d), tl.load(wk_ptr + d)).to(tl.float32)
        w2 = tl.where(is_q, tl.load(wq_ptr + HALF + d), tl.load(wk_ptr + HALF + d)).to(tl.float32)
        x1 = (w1 * (a1 * rstd).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (a2 * rstd).to(dtype).to(tl.float32)).to(dtype)
    c1, c2 = tl.load(cos_ptr + d).to(tl.float32), tl.load(cos_ptr + HALF + d).to(tl.float32)
    s1, s2 = tl.load(sin_ptr + d).to(tl.float32), tl.load(sin_ptr + HALF + d).to(tl.float32)
    y1, y2 = x1.to(tl.float32), x2.to(tl.float32)
    return (y1 * c1 - y2 * s1).to(dtype), (y2 * c2 + y1 * s2).to(dtype)  # rotate_half: (-x2, x1)


@triton.jit
def joined(lo, hi):
    """Halves [M, H] -> [M, 2H]: lo then hi along the last axis."""
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), [lo.shape[0], 2 * lo.shape[1]])


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, out_ptr, H, NQ, stride_qt, stride_qh,
                         stride_kt, stride_kh, stride_ct, stride_st, eps, NORM: tl.constexpr, D: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D // 2)[None, :]
    hm = h < H
    is_q = h < NQ  # heads [0, NQ) are q's (q_norm's weight), the rest k's
    heads = tl.where(is_q, q_ptr + t * stride_qt + h * stride_qh, k_ptr + t * stride_kt + (h - NQ) * stride_kh)
    y1, y2 = normed_rotated(heads, hm, wq_ptr, wk_ptr, is_q, cos_ptr + t * stride_ct, sin_ptr + t * stride_st, eps,
                            NORM, D)
    out = out_ptr + (t * H + h) * D + d
    tl.store(out, y1, mask=hm)
    tl.store(out + D // 2, y2, mask=hm)


def qk_norm_rope_cuda(qk: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                      num_q: int, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qk [T, H, D] with D an even power of two and unit stride along D (engine/qk_rope.py checks)."""
    t, _, d = qk.shape
    return rotate_q_k(qk[:, :num_q], qk[:, num_q:], q_weight, k_weight, eps, cos.reshape(t, d), sin.reshape(t, d))


def rotate_q_k(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
               eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D] and k [T, Hk, D] (any strides but unit along D), cos / sin [T, D] -> one new contiguous
    [T, Hq + Hk, D]: q's heads normed with q_weight, k's with k_weight (None: no norm), all rotated."""
    t, hq, d = q.shape
    h = hq + k.shape[1]
    if cos.stride(1) != 1 or sin.stride(1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    norm = q_weight is not None
    out = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    _qk_norm_rope_kernel[(t,)](q, k, q_weight if norm else q, k_weight if norm else q, cos, sin, out, h, hq,
                               q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0), eps,
                               NORM=norm, D=d, BLOCK_H=triton.next_power_of_2(h), num_warps=4)
    return out
