"""q/k head RMSNorm (Qwen3) and RoPE in one kernel, on the fused q/k/v projection's output (engine only).

In the compiled decode step Inductor emitted two kernels per layer for this (the norm's reduction, then the
rotation with the cos/sin gather): ~4.7 us per layer at 64 rows and ~9.5 at 256 on an H200 (BENCHMARKS.md),
for a few MB of traffic. One program per token here normalises and rotates all of its q and k heads, reading
each head as its two RoPE halves. The op is opaque to torch.compile, so one dynamic-shape compile serves
every CUDA-graph bucket; off the GPU it is the torch reference (the model's own functions).
"""
from __future__ import annotations

import torch

from engine.rope import apply_rope


def reference(qk: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, num_q: int,
              eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope(rms_norm(qk)) over qk [T, H, D]: heads [0, num_q) normed with q_weight [D], the rest with
    k_weight; no norm when the weights are None (Llama / Qwen2)."""
    from engine.model import rms_norm

    if q_weight is not None:
        w = torch.cat([q_weight.expand(num_q, -1), k_weight.expand(qk.shape[1] - num_q, -1)])
        qk = rms_norm(qk, w, eps)
    return apply_rope(qk, cos, sin)


@torch.library.custom_op("npr::qk_norm_rope", mutates_args=())
def qk_norm_rope(qk: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, num_q: int,
                 eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`reference`'s result as a new contiguous [T, H, D] tensor (qk may be a view of the q/k/v output);
    cos / sin [T, 1, D] as engine/rope.py's `cos_sin` gives them."""
    if (q_weight is None) != (k_weight is None):
        raise ValueError("qk_norm_rope: give both q and k norm weights or neither")
    t, h, d = qk.shape
    if cos.shape != (t, 1, d) or sin.shape != (t, 1, d):
        raise ValueError(f"qk_norm_rope: cos / sin {tuple(cos.shape)} / {tuple(sin.shape)} for qk {tuple(qk.shape)}: "
                         f"[T, 1, D] = {(t, 1, d)} expected")
    if q_weight is not None and (q_weight.shape != (d,) or k_weight.shape != (d,) or not 0 < num_q <= h):
        raise ValueError(f"qk_norm_rope: norm weights {tuple(q_weight.shape)} / {tuple(k_weight.shape)} and "
                         f"{num_q} q heads for qk {tuple(qk.shape)}: [D] weights and 0 < num_q <= H expected")
    if not qk.is_cuda or t == 0 or qk.stride(2) != 1 or d % 2 or (d // 2) & (d // 2 - 1):
        return reference(qk, q_weight, k_weight, num_q, eps, cos, sin).contiguous()
    from engine.triton_qk_rope import qk_norm_rope_cuda

    return qk_norm_rope_cuda(qk, q_weight, k_weight, num_q, eps, cos, sin)


@qk_norm_rope.register_fake
def _(qk, q_weight, k_weight, num_q, eps, cos, sin):
    return qk.new_empty(qk.shape)


def norm_rope(qk: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, num_q: int,
              eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The op for inference forwards; a forward that needs gradients keeps the differentiable reference."""
    if torch.is_grad_enabled() and qk.requires_grad:
        return reference(qk, q_weight, k_weight, num_q, eps, cos, sin)
    return qk_norm_rope(qk, q_weight, k_weight, num_q, eps, cos, sin)
