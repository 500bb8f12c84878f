"""Skinny GEMM for decode: y [M, N] = x [M, K] @ w [N, K]^T (+ bias) with few rows (M <= MAX_ROWS), bf16/fp16.

A decode step with few rows is a stream over the weights: its speed is the fraction of HBM bandwidth the
GEMMs reach. cuBLAS picks split-K kernels at M = 1 that reached ~67% of the copy bandwidth on an H200
(BENCHMARKS.md); this kernel streams each weight tile once with deep software pipelining and splits K only
as far as needed to give every SM enough tiles in flight. The grid is (column blocks, K splits, row blocks).
With one split the program writes y directly; with more, each split writes an fp32 partial and the last
split of a tile to arrive (a per-tile counter) sums them in split order: one launch, and results that are
deterministic (never a floating-point atomic) and independent of the run.
With `gated=True` the product is the fused gate/up one and the epilogue applies SwiGLU (silu(gate) * up).
The config is a pure function of (M, N, K) and the SM count, so launches are CUDA-graph capturable.
Tuned with bench/gemm.py (see `config`).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Row counts up to which engine/decode_linear.py uses this kernel: on an H200 it beat cuBLAS at 1 and 16 rows
# on every product; at 64 rows only on the wide ones (gate/up 28.7 vs 31.3 us, LM head 191 vs 198 us; q/k/v,
# o and down lose): bench/gemm.py, BENCHMARKS.md. Module-level so a benchmark can switch it per run
# (MAX_ROWS = 0: cuBLAS everywhere).
DEFAULT_MAX_ROWS = 16
MAX_ROWS = DEFAULT_MAX_ROWS
WIDE_MAX_ROWS, WIDE_MIN_N = 64, 16384


def takes(m: int, n: int) -> bool:
    """Whether an [m, K] @ [K, n] decode product should run here rather than on cuBLAS."""
    return 0 < m <= MAX_ROWS or (MAX_ROWS > 0 and m <= WIDE_MAX_ROWS and n >= WIDE_MIN_N)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, lock_ptr, M, N, K, k_span, splits, stride_xm, stride_wn, up_off,
                   SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, GATED: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # GATED (SwiGLU): w is [2N, K], gate rows then up rows; each program also takes the up tile of its gate
    # columns (rows N + rn) and writes silu(gate) * up: the gate/up product's output never leaves the kernel
    # row blocks vary fastest: the programs of one weight tile run side by side and share it through L2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_span  # a whole number of BLOCK_K; the last split may be shorter
    k_hi = tl.minimum(k_lo + k_span, K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_lo + rk)[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k_lo + rk)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN:  # N % BLOCK_N == 0 and K % BLOCK_K == 0: unmasked weight loads
            w = tl.load(w_ptrs)
            if GATED:
                u = tl.load(w_ptrs + up_off)
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        else:
            km = k + rk < K
            w = tl.load(w_ptrs, mask=(rn[:, None] < N) & km[None, :], other=0.0)
            if GATED:
                u = tl.load(w_ptrs + up_off, mask=(rn[:, None] < N) & km[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & km[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        if GATED:
            acc_up = tl.dot(x, tl.trans(u), acc_up)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tile = rm[:, None] * N + rn[None, :]
    if SPLIT:
        # Split-K without a second launch: every split stores its fp32 partial, then counts itself in on the
        # tile's counter (release after a CTA barrier, so the whole partial is visible); the last one to arrive
        # sums all partials in split order (deterministic), writes y and re-arms the counter for the next call.
        tl.store(part_ptr + pid_k * M * N + tile, acc, mask=mask)
        if GATED:  # the up partials after all gate partials
            tl.store(part_ptr + (splits + pid_k) * M * N + tile, acc_up, mask=mask)
        tl.debug_barrier()
        lock = lock_ptr + pid_m * tl.num_programs(1) + pid_n
        last = tl.atomic_add(lock, 1, sem="acq_rel") == splits - 1
        mask = mask & last  # the other splits are done: every load and store below is masked off for them
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for s in range(splits):
            acc += tl.load(part_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            if GATED:
                acc_up += tl.load(part_ptr + (splits + s) * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(lock, 0, mask=last)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_ptr + N + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if GATED:  # the product rounded to the output dtype first, as when gate/up is a tensor of its own
        dtype = y_ptr.dtype.element_ty
        g = acc.to(dtype).to(tl.float32)
        acc = g * tl.sigmoid(g) * acc_up.to(dtype).to(tl.float32)
    tl.store(y_ptr + tile, acc.to(y_ptr.dtype.element_ty), mask=mask)


_LOCKS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile arrival counters of split launches (this split-K and engine/triton_attention.py's split
    merge), zero between launches (each launch re-arms the ones it used). One buffer per device, so split
    launches must not run concurrently on two streams (the engine decodes on one). Grown
    outside CUDA-graph capture only (a capture must find it big enough: DecodeGraphs warms every bucket up
    eagerly first)."""
    buf = _LOCKS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{n} arrival counters needed during CUDA-graph capture; run the "
                               "shape once before capturing")
        buf = _LOCKS[device] = torch.zeros(max(n, 1 << 14, 2 * (buf.numel() if buf is not None else 0)),
                                           dtype=torch.int32, device=device)
    return buf


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def config(m: int, n: int, k: int, sms: int, block_n: int | None = None, block_k: int | None = None,
           waves: int = 2, num_warps: int = 4, num_stages: int | None = None, block_m: int | None = None,
           splits: int | None = None) -> dict:
    """Launch config of one product, from bench/gemm.py on an H200 (Qwen3-4B and 0.6B projections).
    block_m: rows padded to the tl.dot minimum of 16 (x is tiny: the padding costs no HBM traffic), at most 64
    (more rows are row blocks that re-read the weights, mostly from L2; bench/gemm.py sweeps larger blocks).
    block_n x block_k: 64 x 128 for a single row (fewer, longer-lived programs), 32 x 128 up to 16 rows; above
    (wide products only, `takes`) 64 x 64 with 4 stages, and 128 x 64 with 3 for the LM head.
    splits (K splits per tile, any count; each a whole number of BLOCK_K steps): the fewest powers of two that give
    `waves` tiles per SM, keeping at least two BLOCK_K steps per split for the pipeline to overlap; an
    explicit `splits` overrides (bench/gemm.py sweeps it). Returned as the count of non-empty splits."""
    block_m = block_m or (16 if m <= 16 else 32 if m <= 32 else 64)
    if m <= 16:
        block_n, block_k, num_stages = block_n or (64 if m == 1 else 32), block_k or 128, num_stages or 3
    else:
        head = n >= 65536
        block_n, block_k, num_stages = block_n or (128 if head else 64), block_k or 64, num_stages or (3 if head else 4)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if not splits:
        splits = 1
        while tiles * splits < waves * sms and k // (2 * splits * block_k) >= 2:
            splits *= 2
    splits = triton.cdiv(k, split_span(k, splits, block_k))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, splits=splits, num_warps=num_warps,
                num_stages=num_stages)


def split_span(k: int, splits: int, block_k: int) -> int:
    """K elements per split: a whole number of BLOCK_K steps, the last split taking the rest."""
    return triton.cdiv(triton.cdiv(k, splits), block_k) * block_k


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
                  **tune) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T (+ bias) on the GPU, in x's dtype with fp32 accumulation. gated: w [2I, K] holds
    the gate rows then the up rows (bias likewise), and the result is SwiGLU's silu(gate) * up [M, I]. `tune`
    overrides `config`'s keywords (bench/gemm.py sweeps them)."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or w.stride(1) != 1 or (gated and n % 2):
        raise ValueError(f"skinny_linear: w {tuple(w.shape)} (stride {w.stride()}) does not match x {tuple(x.shape)}"
                         + (" (gated: an even number of rows)" if gated else ""))
    if x.stride(1) != 1:
        x = x.contiguous()
    c = config(m, n, k, _sm_count(x.device.index or 0), **tune)
    bm, bn, bk, splits = c.pop("BLOCK_M"), c.pop("BLOCK_N"), c.pop("BLOCK_K"), c.pop("splits")
    if gated:  # a program takes a gate tile and its up tile: half the columns, the same weight bytes
        n, bn = n // 2, max(16, bn // 2)
    k_span = split_span(k, splits, bk)
    even = n % bn == 0 and k % bk == 0
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    part = torch.empty((1 + gated) * splits, m, n, device=x.device, dtype=torch.float32) if splits > 1 else y
    locks = arrival_counters(x.device, grid[0] * grid[1]) if splits > 1 else y
    _skinny_kernel[grid](x, w, bias if bias is not None else y, y, part, locks, m, n, k, k_span, splits,
                         x.stride(0), w.stride(0), n * w.stride(0) if gated else 0, SPLIT=splits > 1,
                         HAS_BIAS=bias is not None, EVEN=even, GATED=gated, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **c)
    return y


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, N, stride_gu, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # prefills of many tokens: row offsets past 2**31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[M, 2I] (gate then up columns) -> silu(gate) * up [M, I]: SwiGLU after a product this kernel did not take."""
    m, n2 = gate_up.shape
    y = torch.empty(m, n2 // 2, device=gate_up.device, dtype=gate_up.dtype)
    if m:
        _silu_mul_kernel[(m, triton.cdiv(n2 // 2, 1024))](gate_up, y, n2 // 2, gate_up.stride(0), BLOCK=1024)
    return y
