"""Token logprobs over a large vocabulary (151,936 rows for Qwen3) with bounded memory.

`log softmax(hidden @ W^T)[target]` for n rows, one chunk of rows at a time: a chunk's logits are a
[chunk, V] matmul in the compute dtype (bf16 on GPU: cuBLAS accumulates in fp32), reduced in fp32 by a
fused logsumexp + gather, and dropped. Backward recomputes each chunk's logits and forms
g · (onehot − softmax) in one pass, so neither the logits nor an fp32 copy of them is ever kept. The
head-weight gradient is summed over chunks in fp32. With `compiled=True` the two pointwise/reduction
steps are `torch.compile`d (one kernel each, reading the bf16 logits once); eager is the CPU path.
"""
from __future__ import annotations

import torch

LOGIT_CHUNK = 4096  # rows of logits alive at once (151,936 vocab × 4096 rows × 2 B = 1.2 GB in bf16)


def _lse_and_target(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.float()  # under compile the cast fuses into the reductions (no fp32 copy)
    return torch.logsumexp(z, -1), z.gather(-1, targets[:, None])[:, 0]


def _logits_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d(g · logprob[target]) / d logits = g · (onehot(target) − softmax), in the logits' dtype."""
    p = torch.exp(logits.float() - lse[:, None])
    hit = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]
    return (torch.where(hit, 1.0 - p, -p) * g[:, None]).to(logits.dtype)


_compiled: dict = {}


def _kernel(fn, compiled: bool):
    if not compiled:
        return fn
    if fn not in _compiled:  # one compiled function per process, shared by every trainer
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """[a, b) row ranges; a one-row remainder joins the chunk before it (a one-row chunk would make the
    compiler specialise on size 1 and compile a second version)."""
    starts = list(range(0, n, chunk))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [n]))


def _prepare(fn, compiled: bool, *tensors: torch.Tensor):
    """The kernel for these rows; compiled kernels take any row count (>= 2) with one compilation."""
    if not compiled or tensors[0].shape[0] < 2:
        return fn
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return _kernel(fn, True)


class _ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, compiled: bool):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for a, b in _chunks(n, chunk):
            logits, t = hidden[a:b] @ weight.T, targets[a:b]
            lse[a:b], target_logit = _prepare(_lse_and_target, compiled, logits, t)(logits, t)
            out[a:b] = target_logit - lse[a:b]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.compiled = chunk, compiled
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_out = grad_out.float().contiguous()  # one stride layout for the compiled kernel
        for a, b in _chunks(hidden.shape[0], ctx.chunk):
            h = hidden[a:b]
            args = (h @ weight.T, targets[a:b], lse[a:b], grad_out[a:b])
            gz = _prepare(_logits_grad, ctx.compiled, *args)(*args)  # [rows, V] in the compute dtype
            del args
            if need_h:
                grad_h[a:b] = gz @ weight
            if need_w:
                if gz.dtype == grad_w.dtype:
                    grad_w.addmm_(gz.T, h)
                else:
                    grad_w += gz.T @ h
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   chunk: int | None = None, compiled: bool = False) -> torch.Tensor:
    """float32 [n]: log softmax(hidden @ weight^T)[targets], differentiable in hidden and weight.

    Under torch.autocast the two inputs are cast once here (autograd-tracked, so fp32 weights still get
    fp32 gradients) instead of once per chunk and again in backward."""
    chunk = LOGIT_CHUNK if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    with torch.autocast(kind, enabled=False):
        return _ChunkedLogprob.apply(hidden, weight, targets, chunk, compiled)
