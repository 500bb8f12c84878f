"""RMSNorm in one Triton launch, for the engine's decode steps that are not compiled (`CausalLM.set_norm`).

Written eagerly, `rms_norm` (engine/model.py) is eight kernels: to float32, square, mean, + eps, rsqrt, scale,
back to the model's dtype, times the weight. Inside a CUDA-graph step each costs a launch slot and a ramp
whatever its size, and the step runs two norms per layer. One program per row here does them all, with the
reference's rounding: the normalised row is rounded to x's dtype before the weight multiplies it (HF's order),
and the product is rounded once to the dtype torch's promotion gives (weight and x's). A torch.compile'd step
keeps the reference, which Inductor fuses with the residual add before it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x's last dim (weight [D]) as engine.model.rms_norm computes it; x [..., D] on a GPU."""
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} for rows of {d}")
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.result_type(weight, x), device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(d)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), d, eps, BLOCK=block,
                                           num_warps=max(1, min(16, block // 512)))
    return out.view(x.shape)


def decode_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm.kernel` of an engine's model (`CausalLM.set_norm`): the kernel above for inference forwards on a
    GPU; the reference while torch.compile traces (Inductor fuses it with the residual add) and where autograd
    needs a backward."""
    from engine.model import rms_norm as reference

    if (torch.compiler.is_compiling() or not x.is_cuda
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return reference(x, weight, eps)
    return rms_norm(x, weight, eps)
