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
def normed_rotated(ptrs, mask, wq_ptr, wk_ptr, is_q, cos_ptr, sin_ptr, eps, NORM: tl.constexpr, D: tl.constexpr):
    """Head vectors [M, D] at `ptrs` (unit stride along D), RMSNorm'd (NORM; rows where `is_q` [M, 1] with q_norm's
    weight, the others with k_norm's) then rotated by the cos / sin [D] of their token, in their dtype. Each
    element is read with its RoPE partner (d +- D/2), so the result keeps the [M, D] shape `tl.dot` takes: decode
    attention calls this on its q heads and new k (the fused prologue), the kernel below on all of a token's."""
    d = tl.arange(0, D)
    partner = (d + D // 2) % D
    x = tl.load(ptrs, mask=mask, other=0.0)
    xp = tl.load(ptrs + (partner - d)[None, :], mask=mask, other=0.0)
    dtype = x.dtype
    if NORM:
        a, ap = x.to(tl.float32), xp.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(a * a, 1) / D + eps)[:, None]
        w = tl.where(is_q, tl.load(wq_ptr + d)[None, :], tl.load(wk_ptr + d)[None, :]).to(tl.float32)
        wp = tl.where(is_q, tl.load(wq_ptr + partner)[None, :], tl.load(wk_ptr + partner)[None, :]).to(tl.float32)
        x = (w * (a * rstd).to(dtype).to(tl.float32)).to(dtype)
        xp = (wp * (ap * rstd).to(dtype).to(tl.float32)).to(dtype)
    c = tl.load(cos_ptr + d).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + d).to(tl.float32)[None, :]
    y, yp = x.to(tl.float32), xp.to(tl.float32)
    return tl.where(d[None, :] < D // 2, y * c - yp * s, y * c + yp * s).to(dtype)  # rotate_half: (-x2, x1)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, out_ptr, H, NQ, stride_qt, stride_qh,
                         stride_kt, stride_kh, stride_ct, stride_st, eps, NORM: tl.constexpr, D: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    hm = (h < H)[:, None]
    is_q = h < NQ  # heads [0, NQ) are q's (q_norm's weight), the rest k's
    heads = tl.where(is_q, q_ptr + t * stride_qt + h * stride_qh, k_ptr + t * stride_kt + (h - NQ) * stride_kh)
    y = normed_rotated(heads[:, None] + d[None, :], hm, wq_ptr, wk_ptr, is_q[:, None], cos_ptr + t * stride_ct,
                       sin_ptr + t * stride_st, eps, NORM, D)
    tl.store(out_ptr + (t * H + h[:, None]) * D + d[None, :], y, mask=hm)


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
