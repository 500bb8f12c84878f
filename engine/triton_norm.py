"""Triton kernel behind engine/fused_decode.py's fallbacks: the residual add and RMSNorm of whole rows, when the
product before or after it runs on cuBLAS (so no GEMM epilogue or prologue can take them)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _residual_norm_kernel(y_ptr, res_ptr, x_ptr, h_ptr, ssq_ptr, g_ptr, N, eps, HAS_RES: tl.constexpr,
                          WANT_H: tl.constexpr, WANT_SSQ: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    s = tl.load(y_ptr + row * N + cols, mask=mask, other=0.0)
    if HAS_RES:  # x = x + y in the model's dtype
        s = (tl.load(res_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32) + s.to(tl.float32)).to(s.dtype)
        tl.store(x_ptr + row * N + cols, s, mask=mask)
    sq = tl.where(mask, s.to(tl.float32) * s.to(tl.float32), 0.0)
    if WANT_SSQ:  # per 16 columns, for a GEMM prologue (engine/triton_gemm.py NORM)
        tl.store(ssq_ptr + row * tl.cdiv(N, 16) + tl.arange(0, BLOCK // 16),
                 tl.sum(tl.reshape(sq, (BLOCK // 16, 16)), 1), mask=tl.arange(0, BLOCK // 16) * 16 < N)
    if WANT_H:  # weight * (x * rstd).to(dtype), as model.rms_norm
        rstd = tl.rsqrt(tl.sum(sq, 0) / N + eps)
        g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * N + cols, (g * (s.to(tl.float32) * rstd).to(s.dtype).to(tl.float32)).to(s.dtype),
                 mask=mask)


def residual_norm(y: torch.Tensor, res: torch.Tensor | None, g: torch.Tensor, eps: float, x: torch.Tensor,
                  h: torch.Tensor, ssq: torch.Tensor, want_h: bool, want_ssq: bool) -> None:
    """x = res + y (res None: x is y), then into h: RMSNorm(x) * g, and/or into ssq: x's sums of squares per 16
    columns. y, res, x, h [M, N] contiguous; ssq [M, cdiv(N, 16)] float32."""
    m, n = y.shape
    if m:
        _residual_norm_kernel[(m,)](y, res if res is not None else y, x, h, ssq, g, n, eps, HAS_RES=res is not None,
                                    WANT_H=want_h, WANT_SSQ=want_ssq, BLOCK=max(16, triton.next_power_of_2(n)),
                                    num_warps=4)
