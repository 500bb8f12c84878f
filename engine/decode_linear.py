"""The engine's GEMM for projections and the LM head (`CausalLM.set_gemm(decode_linear)`).

Decode batches of few rows (`triton_gemm.takes`: up to 16, or 64 on wide products) on an Ampere-or-newer GPU
go to the Triton skinny GEMM (weight streaming: engine/triton_gemm.py); everything else (prefill, big batches,
CPU, float32, older GPUs) to F.linear. The choice is made inside an opaque custom op from the concrete row
count, so one dynamic-shape torch.compile of the decode step serves every CUDA-graph bucket, and
`triton_gemm.MAX_ROWS = 0` switches a process back to cuBLAS without recompiling (bench/engine.py compares
both in one run). `decode_swiglu` is the MLP's gate/up product with SwiGLU applied: in the Triton kernel's
epilogue when it takes the product (the gate/up output never reaches memory, one launch fewer per layer),
else cuBLAS and one elementwise kernel (what Inductor emitted for it). Products left to cuBLAS run the cuBLASLt
algorithm `tune_decode_gemms` measured fastest for their shape, where one beat F.linear (engine/cublaslt.py).
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
        return _cublas(x, weight, bias)
    return F.linear(x, weight, bias)


def _cublas(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, or the tuned cuBLASLt algorithm for this shape (bias-free products only)."""
    if bias is None:
        from engine import cublaslt

        algo = cublaslt.choice(x, weight)
        if algo is not None:
            return cublaslt.linear(x, weight, algo)
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
        return triton_gemm.silu_mul(_cublas(x, weight, bias))
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


def tune_decode_gemms(model, rows: list[int]) -> list[dict]:
    """For each row count and each weight shape of `model`'s bias-free projections and LM head that the Triton
    kernel does not take: time cuBLASLt's candidate algorithms over the model's own weights of that shape (the
    layers' distinct copies: HBM time, as a decode step streams them) and keep the fastest where it beats F.linear
    (`cublaslt.tune`). On a GPU with half-precision weights; elsewhere nothing to do. Returns the measurements."""
    from engine import cublaslt
    from engine.model import Linear

    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for mod in model.modules():
        if isinstance(mod, Linear) and mod.bias is None:
            by_shape.setdefault(tuple(mod.weight.shape), []).append(mod.weight)
    head = getattr(model, "head_weight", None)
    if head is not None and all(head is not w for ws in by_shape.values() for w in ws):
        by_shape.setdefault(tuple(head.shape), []).append(head)
    groups = [ws for ws in by_shape.values() if _triton_capable(ws[0], ws[0])]  # GPU, half precision
    if not groups:
        return []
    from engine import triton_gemm  # a GPU from here: Triton is there

    reports = []
    for weights in groups:
        streamed, use = 0, []
        for w in weights:  # enough distinct copies to exceed L2 several times over, not all 36 layers
            use.append(w)
            streamed += w.numel() * w.element_size()
            if streamed >= cublaslt.TUNE_BYTES:
                break
        with torch.no_grad():
            reports += [cublaslt.tune(m, use) for m in rows if not triton_gemm.takes(m, use[0].shape[0])]
    return reports


decode_linear.swiglu = decode_swiglu  # CausalLM.set_gemm gives it to the fused MLPs
