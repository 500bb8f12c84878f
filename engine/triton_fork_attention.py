"""Decode attention for fork groups: the rows of one group read their shared trunk once.

NPR branches forked from one point decode side by side, and each row's context is the group's trunk (prompt,
guideline, earlier steps) followed by its own slots. engine/triton_attention.py gives every (row, KV head) its
own program, so a trunk of T slots is read K times for K branches (mostly from L2, but each program still walks
it: at 384 rows x 256 slots, 3/4 of them shared by 4 rows, 82 us against 111 for unshared rows, where the
distinct bytes need ~45 at the copy bandwidth; H200, BENCHMARKS.md). Here one program per (group, KV head) puts
the GROUP query heads of all the group's rows in one tile of BLOCK_M = rows x GROUP query vectors, streams the
trunk once for all of them, then each row's own slots with the other rows masked, then each row's new token
(the fused KV write, as `decode_attention(new_kv=...)`), in one online softmax per query vector.

Groups are consecutive query rows: `starts[g]` is group g's first row, its rows run to `starts[g + 1]` (clamped
to the launch's rows), at most BLOCK_M // GROUP of them (`cuda_graphs.rows_per_group`), and `trunks[g]` slots lead every one of their table
rows alike. A group's count and layout live on the GPU, so the launch is CUDA-graph capturable: the grid has a
program per row and KV head, and programs past the last group return at once. q and the new k come already
normed and rotated (the q/k kernel runs first, as for big batches in engine/triton_attention.py).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _tiles(q, acc, m_i, l_i, kc_ptr, vc_ptr, idx_ptr, start, lo, hi, kvh, who, scale_log2,
           KV_ROW: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of the query vectors where `who` over the table entries [lo, hi) from `start`."""
    offs_d = tl.arange(0, D)
    for s in range(lo, hi, BLOCK_N):
        offs_n = s + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        slots = tl.load(idx_ptr + start + offs_n, mask=nmask, other=0).to(tl.int64)
        kv_off = slots[:, None] * KV_ROW + kvh * D + offs_d[None, :]
        k = tl.load(kc_ptr + kv_off, mask=nmask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        qk = tl.where(who[:, None] & nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a vector that has seen nothing yet stays empty
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + kv_off, mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fork_decode_kernel(q_ptr, kc_ptr, vc_ptr, rows_ptr, len_ptr, table_ptr, out_ptr, kn_ptr, vn_ptr, slot_ptr,
                        start_ptr, trunk_ptr, num_rows, scale_log2, stride_qt, stride_qh, stride_ot, stride_oh,
                        table_stride, stride_kn, stride_vn,
                        KV_ROW: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
                        BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    r0 = tl.load(start_ptr + g)
    if r0 < num_rows:
        r1 = tl.minimum(tl.load(start_ptr + g + 1), tl.minimum(num_rows, r0 + BLOCK_M // GROUP))
        trunk = tl.load(trunk_ptr + g)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        own = offs_m // GROUP  # the vector's row in the group
        live = own < r1 - r0
        qrow = r0 + tl.where(live, own, 0)
        heads = kvh * GROUP + offs_m % GROUP
        q = tl.load(q_ptr + qrow[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=live[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        first = tl.load(rows_ptr + r0).to(tl.int64) * table_stride
        acc, m_i, l_i = _tiles(q, acc, m_i, l_i, kc_ptr, vc_ptr, table_ptr, first, 0, trunk, kvh, live, scale_log2,
                               KV_ROW, D, BLOCK_N, PREC)
        for i in range(0, r1 - r0):  # each row's own slots, up to its new token (its last entry)
            start = tl.load(rows_ptr + r0 + i).to(tl.int64) * table_stride
            n = tl.load(len_ptr + r0 + i)
            acc, m_i, l_i = _tiles(q, acc, m_i, l_i, kc_ptr, vc_ptr, table_ptr, start, trunk, n - 1, kvh,
                                   live & (own == i), scale_log2, KV_ROW, D, BLOCK_N, PREC)
            if n > 0:  # the new token: written to the cache by this program and attended to from registers
                k_new = tl.load(kn_ptr + (r0 + i) * stride_kn + kvh * D + offs_d)
                v_new = tl.load(vn_ptr + (r0 + i) * stride_vn + kvh * D + offs_d)
                slot = tl.load(slot_ptr + r0 + i).to(tl.int64)
                if slot >= 0:  # < 0: a padding row of a CUDA-graph bucket writes nothing
                    tl.store(kc_ptr + slot * KV_ROW + kvh * D + offs_d, k_new.to(kc_ptr.dtype.element_ty))
                    tl.store(vc_ptr + slot * KV_ROW + kvh * D + offs_d, v_new.to(vc_ptr.dtype.element_ty))
                k_new = k_new.to(kc_ptr.dtype.element_ty).to(tl.float32)  # as the cache holds it
                v_new = v_new.to(vc_ptr.dtype.element_ty).to(tl.float32)
                mine = live & (own == i)
                qk1 = tl.where(mine, tl.sum(q.to(tl.float32) * k_new[None, :], 1) * scale_log2, float("-inf"))
                m_new = tl.maximum(m_i, qk1)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p1 = tl.math.exp2(qk1 - m_safe)
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + p1
                acc = acc * alpha[:, None] + p1[:, None] * v_new[None, :]
                m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty context gives zeros, never NaN
        tl.store(out_ptr + qrow[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=live[:, None])


def fork_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, table: torch.Tensor,
                          lens: torch.Tensor, rows: torch.Tensor, new_kv: tuple, starts: torch.Tensor,
                          trunks: torch.Tensor, out: torch.Tensor | None = None, block_n: int = 64) -> torch.Tensor:
    """q [R, Hq, D] (normed and rotated); caches [S, Hkv, D]; row r's context: `table[rows[r], :lens[r]]`, its
    last entry its new token, whose k / v come in new_kv = (k [R, Hkv, D], v [R, Hkv, D], slots int32 [R]) and are
    written to `slots[r]` (< 0: not written). Groups: int32 `starts` [>= G + 1] (first rows, ascending, then any
    values >= R; a group holds at most `cuda_graphs.rows_per_group` rows) and `trunks` [>= G] (table entries its rows share,
    fewer than each one's length). Returns [R, Hq, D] in q's dtype, as `decode_attention` would."""
    r, hq, d = q.shape
    hkv = k_cache.shape[1]
    k_new, v_new, new_slots = new_kv
    k_new, v_new = k_new.reshape(r, hkv * d), v_new.reshape(r, hkv * d)
    if k_new.stride(1) != 1:
        k_new = k_new.contiguous()
    if v_new.stride(1) != 1:
        v_new = v_new.contiguous()
    if hq % hkv or q.stride(2) != 1 or table.stride(1) != 1 or len(starts) < r + 1 or len(trunks) < r:
        raise ValueError(f"fork_decode_attention: q {tuple(q.shape)} over {hkv} KV heads, table strides "
                         f"{table.stride()}, {len(starts)} starts and {len(trunks)} trunks for {r} rows (starts "
                         "need R + 1 entries, trunks R)")
    out = torch.empty_like(q) if out is None else out
    if r == 0:
        return out
    group = hq // hkv
    _fork_decode_kernel[(r, hkv)](
        q, k_cache, v_cache, rows, lens, table, out, k_new, v_new, new_slots, starts, trunks, r,
        math.log2(math.e) / math.sqrt(d), q.stride(0), q.stride(1), out.stride(0), out.stride(1), table.stride(0),
        k_new.stride(0), v_new.stride(0),
        KV_ROW=hkv * d, GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(group)), D=d, BLOCK_N=block_n,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
    return out

