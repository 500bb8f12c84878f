"""The engine's GEMM for projections and the LM head (`CausalLM.set_gemm(decode_linear)`).

Decode batches of few rows (`triton_gemm.takes`: up to 16, or 64 on wide products) on an Ampere-or-newer GPU
go to the Triton skinny GEMM (weight streaming: engine/triton_gemm.py); everything else (prefill, big batches,
CPU, float32, older GPUs) to F.linear. The choice is made inside an opaque custom op from the concrete row
count, so one dynamic-shape torch.compile of the decode step serves every CUDA-graph bucket, and
`triton_gemm.MAX_ROWS = 0` switches a process back to cuBLAS without recompiling (bench/engine.py compares
both in one run). `decode_swiglu` is the MLP's gate/up product with SwiGLU applied: in the Triton kernel's
epilogue when it takes the product (the gate/up output never reaches memory, one launch fewer per layer),
else cuBLAS and one elementwise kernel (what Inductor emitted for it).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _tensor_cores(device_index: int) -> bool:
    """bf16/fp16 tl.dot on this GPU: Ampere (sm80) or newer, where the kernel was written and measured."""
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


@torch.library.custom_op("npr::decode_linear", mutates_args=())
def _decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _triton_capable(x, weight):
        from engine import triton_gemm

        if triton_gemm.takes(x.shape[0], weight.shape[0]):
            return triton_gemm.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@_decode_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _triton_capable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The Triton kernels can run this product (GPU, half-precision operands, tensor cores); `takes` decides."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and _tensor_cores(x.device.index or 0))


def _reference_swiglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    gate, up = F.linear(x, weight, bias).chunk(2, -1)
    return F.silu(gate) * up


@torch.library.custom_op("npr::decode_swiglu", mutates_args=())
def _decode_swiglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _triton_capable(x, weight):
        from engine import triton_gemm

        if triton_gemm.takes(x.shape[0], weight.shape[0]):
            return triton_gemm.skinny_linear(x, weight, bias, gated=True)
        return triton_gemm.silu_mul(F.linear(x, weight, bias))
    return _reference_swiglu(x, weight, bias)


@_decode_swiglu.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0] // 2)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias), no autograd: for inference forwards only."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return F.linear(x, weight, bias)  # a training forward through an engine model: keep autograd
    lead = x.shape[:-1]
    return _decode_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*lead, weight.shape[0])


def decode_swiglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up of the fused gate/up product (weight [2I, K]: gate rows, then up rows) -> [..., I]."""
    if weight.shape[0] % 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"decode_swiglu: weight {tuple(weight.shape)} for x {tuple(x.shape)}: [2I, K] with K = "
                         "x's last dim expected")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _reference_swiglu(x, weight, bias)
    lead = x.shape[:-1]
    return _decode_swiglu(x.reshape(-1, x.shape[-1]), weight, bias).view(*lead, weight.shape[0] // 2)


decode_linear.swiglu = decode_swiglu  # CausalLM.set_gemm gives it to the fused MLPs

# Experiment (branch exp/chained-mlp): the whole MLP as one persistent launch (engine/triton_chained_mlp.py) where
# the Triton GEMM would take the gate/up product; off, the op runs the same two launches as before. Flipping it
# needs a new graph capture, not a recompile (the op is opaque): bench/engine.py --gemm triton,triton-chained.
CHAINED_MLP = False


@torch.library.custom_op("npr::decode_mlp", mutates_args=())
def _decode_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    if CHAINED_MLP and _triton_capable(x, w_gate_up):
        from engine import triton_chained_mlp, triton_gemm

        if triton_gemm.takes(x.shape[0], w_gate_up.shape[0]) and triton_chained_mlp.fits(x, w_gate_up, w_down):
            return triton_chained_mlp.chained_mlp(x, w_gate_up, w_down)
    return _decode_linear(_decode_swiglu(x, w_gate_up, None), w_down, None)


@_decode_mlp.register_fake
def _(x, w_gate_up, w_down):
    return x.new_empty(x.shape[0], w_down.shape[0])


def decode_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate) * up) of a bias-free fused MLP (w_gate_up [2I, K], w_down [K, I]) -> [..., K]."""
    if torch.is_grad_enabled() and (x.requires_grad or w_gate_up.requires_grad or w_down.requires_grad):
        return F.linear(_reference_swiglu(x, w_gate_up, None), w_down)
    lead = x.shape[:-1]
    return _decode_mlp(x.reshape(-1, x.shape[-1]), w_gate_up, w_down).view(*lead, w_down.shape[0])


decode_linear.mlp = decode_mlp  # CausalLM.set_gemm gives it to bias-free fused MLPs
