"""Experiment (branch exp/chained-mlp, never measured yet): a decode step's MLP as ONE persistent launch.

At 64 rows every decode-step kernel runs at 92-96% of a device copy of its own bytes, yet the step is ~0.4 ms
of GPU time away from 70% of the roofline: what is left is the ramp-up and tail each launch pays (BENCHMARKS.md).
Here gate/up + SwiGLU and down share one launch, so the end of the first product and the start of the second
overlap instead of each paying its own ramp and tail.

Tasks, taken in order from one atomic queue by however many programs run (a persistent grid):
  gate/up tiles  task t < N1: the SwiGLU output act[:, t*BN1 : (t+1)*BN1] (gate and up rows of those columns),
                 written to `act`; then the tile counts itself in on its k-range's counter;
  down tiles     the rest, k-range first: down-proj columns [n*BN2, +BN2) over one k-range of act (a split of K),
                 each first waiting until every gate/up tile of its k-range has counted in, then storing an fp32
                 partial; the last split of a column tile to arrive sums the partials in order and writes y.
A task only waits on tasks taken before it, which running programs hold: no deadlock at any grid size (and in
the Triton interpreter, where programs run one after the other, the first takes every task in order). The last
program to leave re-arms every counter for the next launch (CUDA-graph replays).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _chained_mlp_kernel(x_ptr, wgu_ptr, wd_ptr, act_ptr, part_ptr, y_ptr, ctr_ptr, M, H, I, stride_xm,
                        N1: tl.constexpr, N2: tl.constexpr, SPLITS: tl.constexpr, TPR: tl.constexpr,
                        BLOCK_M: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, BN2: tl.constexpr,
                        BK2: tl.constexpr):
    # counters: [0] next task, [1] programs gone, [2, 2 + SPLITS) gate/up tiles done per k-range,
    # [2 + SPLITS, 2 + SPLITS + N2) down splits arrived per column tile
    total = N1 + N2 * SPLITS
    rm = tl.arange(0, BLOCK_M)
    mrow = rm < M
    task = tl.atomic_add(ctr_ptr, 1)
    while task < total:
        if task < N1:  # gate/up + SwiGLU tile
            rn = task * BN1 + tl.arange(0, BN1)
            rk = tl.arange(0, BK1)
            x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
            g_ptrs = wgu_ptr + rn[:, None].to(tl.int64) * H + rk[None, :]
            u_off = I.to(tl.int64) * H
            acc_g = tl.zeros((BLOCK_M, BN1), tl.float32)
            acc_u = tl.zeros((BLOCK_M, BN1), tl.float32)
            for k in range(0, H, BK1):
                x = tl.load(x_ptrs, mask=mrow[:, None], other=0.0)
                acc_g = tl.dot(x, tl.trans(tl.load(g_ptrs)), acc_g)
                acc_u = tl.dot(x, tl.trans(tl.load(g_ptrs + u_off)), acc_u)
                x_ptrs += BK1
                g_ptrs += BK1
            dtype = act_ptr.dtype.element_ty  # rounded as the gate/up product and SwiGLU are in torch
            g = acc_g.to(dtype).to(tl.float32)
            act = g * tl.sigmoid(g) * acc_u.to(dtype).to(tl.float32)
            tl.store(act_ptr + rm[:, None] * I + rn[None, :], act.to(dtype), mask=mrow[:, None])
            tl.debug_barrier()  # the whole tile stored before it counts in (release: visible to the acquirer)
            tl.atomic_add(ctr_ptr + 2 + task // TPR, 1, sem="release")
        else:  # down tile: one k-range (split) of one column tile
            t = task - N1
            split = t // N2
            n_tile = t % N2
            need = tl.minimum(TPR, N1 - split * TPR)
            while tl.atomic_add(ctr_ptr + 2 + split, 0, sem="acquire") < need:
                pass
            k_lo = split * TPR * BN1
            k_hi = tl.minimum(k_lo + TPR * BN1, I)
            cn = n_tile * BN2 + tl.arange(0, BN2)
            ck = tl.arange(0, BK2)
            a_ptrs = act_ptr + rm[:, None] * I + (k_lo + ck)[None, :]
            w_ptrs = wd_ptr + cn[:, None].to(tl.int64) * I + (k_lo + ck)[None, :]
            dacc = tl.zeros((BLOCK_M, BN2), tl.float32)
            for k in range(k_lo, k_hi, BK2):
                a = tl.load(a_ptrs, mask=mrow[:, None], other=0.0, cache_modifier=".cg")  # written this launch
                dacc = tl.dot(a, tl.trans(tl.load(w_ptrs)), dacc)
                a_ptrs += BK2
                w_ptrs += BK2
            tile = rm[:, None] * H + cn[None, :]
            tl.store(part_ptr + split * M * H + tile, dacc, mask=mrow[:, None])
            tl.debug_barrier()
            lock = ctr_ptr + 2 + SPLITS + n_tile
            last = tl.atomic_add(lock, 1, sem="acq_rel") == SPLITS - 1
            if last:  # the other splits are in: sum them in split order (deterministic) and write y
                dacc = tl.zeros((BLOCK_M, BN2), tl.float32)
                for s in range(SPLITS):
                    dacc += tl.load(part_ptr + s * M * H + tile, mask=mrow[:, None], other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + tile, dacc.to(y_ptr.dtype.element_ty), mask=mrow[:, None])
                tl.atomic_xchg(lock, 0)
        task = tl.atomic_add(ctr_ptr, 1)
    # every task is taken; the last program out knows no one else will take or wait again: re-arm
    gone = tl.atomic_add(ctr_ptr + 1, 1, sem="acq_rel")
    if gone == tl.num_programs(0) - 1:
        for j in range(SPLITS):
            tl.atomic_xchg(ctr_ptr + 2 + j, 0)
        tl.atomic_xchg(ctr_ptr + 1, 0)
        tl.atomic_xchg(ctr_ptr, 0)


_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters of one chained launch shape, re-armed by every launch (grown outside capture)."""
    key = (device, n)
    if key not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("chained_mlp: run the shape once before CUDA-graph capture")
        _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _COUNTERS[key]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def fits(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, splits: int = 8, bn1: int = 32,
         bn2: int = 64, bk2: int = 64) -> bool:
    """Whether `chained_mlp` with these tiles takes this product (else it raises)."""
    m, h = x.shape
    i = w_down.shape[1]
    n1 = i // bn1
    tpr = triton.cdiv(max(n1, 1), splits)
    last = n1 - (triton.cdiv(max(n1, 1), tpr) - 1) * tpr  # gate/up tiles in the last k-range
    return (0 < m <= 64 and w_gate_up.shape == (2 * i, h) and w_down.shape == (h, i) and i % bn1 == 0
            and h % 128 == 0 and h % bn2 == 0 and (tpr * bn1) % bk2 == 0 and (last * bn1) % bk2 == 0
            and x.stride(1) == 1 and w_gate_up.is_contiguous() and w_down.is_contiguous())


def chained_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, splits: int = 8, bn1: int = 32,
                bk1: int | None = None, bn2: int = 64, bk2: int = 64, programs: int | None = None, num_warps: int = 4,
                num_stages: int | None = None) -> torch.Tensor:
    """down(silu(gate) * up) for x [M, H] (M <= 64), w_gate_up [2I, H] (gate rows, then up rows), w_down [H, I],
    in x's dtype, as one launch. Tiles as the skinny GEMM's gated product (128-wide K steps and 3 stages up to 16
    rows, 64 and 4 above). programs: the persistent grid (default: 2 per SM on a GPU, the most that fit at 64
    rows by `bench/triton_resources.py`'s count of shared memory; 4 off it)."""
    m, h = x.shape
    bk1 = bk1 or (128 if m <= 16 else 64)
    num_stages = num_stages or (3 if m <= 16 else 4)
    i = w_down.shape[1]
    if m > 64 or w_gate_up.shape != (2 * i, h) or w_down.shape != (h, i) or x.stride(1) != 1:
        raise ValueError(f"chained_mlp: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)}, w_down "
                         f"{tuple(w_down.shape)}: M <= 64, [2I, H] and [H, I] with unit stride along H expected")
    n1 = i // bn1
    tpr = triton.cdiv(n1, splits)
    last = n1 - (triton.cdiv(n1, tpr) - 1) * tpr  # gate/up tiles in the last k-range
    if i % bn1 or h % bk1 or h % bn2 or (tpr * bn1) % bk2 or (last * bn1) % bk2 or not w_gate_up.is_contiguous() \
            or not w_down.is_contiguous():
        raise ValueError(f"chained_mlp: H {h}, I {i} must divide into the tiles (bn1 {bn1}, bk1 {bk1}, bn2 {bn2}, "
                         f"bk2 {bk2}; a k-range of {tpr} x {bn1} columns) and the weights be contiguous")
    splits = triton.cdiv(n1, tpr)  # non-empty k-ranges only
    n2 = h // bn2
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    act = torch.empty(m, i, dtype=x.dtype, device=x.device)
    part = torch.empty(splits, m, h, dtype=torch.float32, device=x.device)
    y = torch.empty(m, h, dtype=x.dtype, device=x.device)
    ctr = _counters(x.device, 2 + splits + n2)
    if programs is None:
        programs = 2 * _sm_count(x.device.index or 0) if x.is_cuda else 4
    _chained_mlp_kernel[(programs,)](x, w_gate_up, w_down, act, part, y, ctr, m, h, i, x.stride(0), N1=n1, N2=n2,
                                     SPLITS=splits, TPR=tpr, BLOCK_M=block_m, BN1=bn1, BK1=bk1, BN2=bn2, BK2=bk2,
                                     num_warps=num_warps, num_stages=num_stages)
    return y
