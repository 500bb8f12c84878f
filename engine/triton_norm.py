"""RMSNorm in one Triton launch, for the engine's decode steps that are not compiled (`CausalLM.set_norm`).

Written eagerly, `rms_norm` (engine/model.py) is eight kernels: to float32, square, mean, + eps, rsqrt, scale,
back to the model's dtype, times the weight. Inside a CUDA-graph step each costs a launch slot and a ramp
whatever its size, and the step runs two norms per layer. One program per row here does them all, with the
reference's rounding: the normalised row is rounded to x's dtype before the weight multiplies it (HF's order),
and the product is rounded once to the dtype torch's promotion gives (weight and x's). `add_rms_norm` also
takes the residual add before the norm (`RMSNorm.add`: the model leaves each layer's last add to the next
norm), so an uncompiled step launches what Inductor fuses in a compiled one; a torch.compile'd step keeps the
reference, which Inductor fuses itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.triton_attention import unit_stride_rows


@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_d, stride_out, stride_sum, n, eps,
                     ADD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if ADD:  # the residual add first, rounded as torch's `x + delta`, and written: the layer's running sum
        d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    d = x.shape[-1]
    if weight.shape != (d,) or (delta is not None and delta.shape != x.shape):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)}"
                         + ("" if delta is None else f", delta {tuple(delta.shape)}") + f" for x {tuple(x.shape)}")
    rows, weight = unit_stride_rows(x, -1, d), weight.contiguous()
    summed = None if delta is None else torch.empty(rows.shape, dtype=torch.result_type(x, delta), device=x.device)
    dr = rows if delta is None else unit_stride_rows(delta, -1, d)
    out = torch.empty(rows.shape, dtype=torch.result_type(weight, rows if summed is None else summed),
                      device=x.device)
    sr = out if summed is None else summed
    if rows.shape[0]:
        block = triton.next_power_of_2(d)
        _rms_norm_kernel[(rows.shape[0],)](rows, dr, weight, out, sr, rows.stride(0), dr.stride(0), out.stride(0),
                                           sr.stride(0), d, eps, ADD=delta is not None, BLOCK=block,
                                           num_warps=max(1, min(16, block // 512)))
    return out.view(x.shape), None if summed is None else summed.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x's last dim (weight [D]) as engine.model.rms_norm computes it; x [..., D] on a GPU."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, its RMSNorm) in one launch, as `h = x + delta; rms_norm(h, weight, eps)` computes them."""
    out, summed = _launch(x, delta, weight, eps)
    return summed, out


def _kernel_applies(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """An inference forward on a GPU: not while torch.compile traces (Inductor fuses the reference with the
    residual add) and not where autograd needs a backward (the kernel has none)."""
    return (not torch.compiler.is_compiling() and x.is_cuda
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others))))


def decode_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm.kernel` of an engine's model (`CausalLM.set_norm`): the kernel above where it applies, else the
    model's torch code."""
    from engine.model import rms_norm as reference

    return rms_norm(x, weight, eps) if _kernel_applies(x, weight) else reference(x, weight, eps)


def decode_add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """`RMSNorm.add` through the engine's kernel: (x + delta, its norm) in one launch where the kernel applies,
    else the reference's two steps."""
    from engine.model import rms_norm as reference

    if _kernel_applies(x, delta, weight):
        return add_rms_norm(x, delta, weight, eps)
    h = x + delta
    return h, reference(h, weight, eps)


decode_rms_norm.add = decode_add_rms_norm  # RMSNorm.add takes it: the residual add and the next norm, one launch
