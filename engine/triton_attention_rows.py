"""Decode attention with one program per (row, split) over ALL KV heads (an experiment: engine/triton_attention.py
`ROW_PROGRAMS`).

engine/triton_attention.py runs a program per (row, KV head, split): each reads 256 B of a slot's K (and V) at
a 2-KB stride, and the other seven heads' programs read the rest of the same 2 KB at other times. With the
pool's scattered slots every such read is a separate DRAM access; at 256 rows attention reached 3.6 TB/s of
4.3 (BENCHMARKS.md). Here a program reads each slot's K and V for all heads at once (2 KB contiguous each),
and does the GQA products as batched dots over the KV heads ([Hkv, group padded to 16, D] x [Hkv, D, BLOCK_N]).
Same contract as `decode_attention` with a padded slot table and `new_kv` (the fused KV write); splits merged
by the last split to arrive, as there.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _rows_kernel(q_ptr, kc_ptr, vc_ptr, rows_ptr, len_ptr, idx_ptr, out_ptr, mo_ptr, ml_ptr, lock_ptr,
                 kn_ptr, vn_ptr, slot_ptr, scale_log2, stride_qt, stride_ot, table_stride, stride_kn, stride_vn,
                 HKV: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPLITS: tl.constexpr, NEW_KV: tl.constexpr, PREC: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = tl.load(rows_ptr + row).to(tl.int64) * table_stride
    n = tl.load(len_ptr + row)
    per = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per
    hi = tl.minimum(lo + per, n)
    cache_hi = tl.minimum(hi, n - 1) if NEW_KV else hi
    h3 = tl.arange(0, HKV)[:, None, None]
    g3 = tl.arange(0, GP)[None, :, None]
    d3 = tl.arange(0, D)[None, None, :]
    gmask = g3 < GROUP
    heads = h3 * GROUP + g3  # [HKV, GP, 1]
    q = tl.load(q_ptr + row * stride_qt + heads * D + d3, mask=gmask, other=0.0)  # [HKV, GP, D]
    m_i = tl.full([HKV, GP], float("-inf"), tl.float32)
    l_i = tl.zeros([HKV, GP], tl.float32)
    acc = tl.zeros([HKV, GP, D], tl.float32)
    n3 = tl.arange(0, BLOCK_N)[None, :, None]
    for s in range(lo, cache_hi, BLOCK_N):
        offs_n = s + tl.arange(0, BLOCK_N)
        nmask = offs_n < cache_hi
        slots = tl.load(idx_ptr + start + offs_n, mask=nmask, other=0).to(tl.int64)
        kv_off = tl.reshape(slots, (1, BLOCK_N, 1)) * (HKV * D) + h3 * D + d3  # [HKV, BLOCK_N, D]: 2 KB per slot
        m3 = tl.reshape(nmask, (1, BLOCK_N, 1))
        k = tl.load(kc_ptr + kv_off, mask=m3, other=0.0)
        qk = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PREC) * scale_log2  # [HKV, GP, BLOCK_N]
        qk = tl.where(tl.reshape(nmask, (1, 1, BLOCK_N)), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 2))
        p = tl.math.exp2(qk - m_new[:, :, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 2)
        v = tl.load(vc_ptr + kv_off, mask=m3, other=0.0)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    if NEW_KV:
        if (n > 0) & (lo <= n - 1) & (n - 1 < hi):  # this split holds the row's new token: write it, attend to it
            hd = tl.arange(0, HKV)[:, None] * D + tl.arange(0, D)[None, :]  # [HKV, D]
            k_new = tl.load(kn_ptr + row * stride_kn + hd)
            v_new = tl.load(vn_ptr + row * stride_vn + hd)
            slot = tl.load(slot_ptr + row).to(tl.int64)
            if slot >= 0:
                tl.store(kc_ptr + slot * (HKV * D) + hd, k_new.to(kc_ptr.dtype.element_ty))
                tl.store(vc_ptr + slot * (HKV * D) + hd, v_new.to(vc_ptr.dtype.element_ty))
            k_new = k_new.to(kc_ptr.dtype.element_ty).to(tl.float32)
            v_new = v_new.to(vc_ptr.dtype.element_ty).to(tl.float32)
            qk1 = tl.sum(q.to(tl.float32) * k_new[:, None, :], 2) * scale_log2  # [HKV, GP]
            m_new = tl.maximum(m_i, qk1)
            p1 = tl.math.exp2(qk1 - m_new)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + p1
            acc = acc * alpha[:, :, None] + p1[:, :, None] * v_new[:, None, :]
            m_i = m_new
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, :, None]
    o_ptrs = out_ptr + row * stride_ot + heads * D + d3
    if SPLITS == 1:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=gmask)
    else:  # partials [R, Hq, SPLITS, (D)]; the last split of the row merges them in split order
        heads2 = tl.arange(0, HKV)[:, None] * GROUP + tl.arange(0, GP)[None, :]  # [HKV, GP]
        gm2 = (tl.arange(0, GP) < GROUP)[None, :]
        base2 = (row * (HKV * GROUP) + heads2) * SPLITS
        base = base2[:, :, None]
        lse = tl.where(nonempty, m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(mo_ptr + (base + split) * D + d3, out, mask=gmask)
        tl.store(ml_ptr + base2 + split, lse, mask=gm2)
        tl.debug_barrier()
        lock = lock_ptr + row
        last = tl.atomic_add(lock, 1, sem="acq_rel") == SPLITS - 1
        if last:
            m = tl.full([HKV, GP], float("-inf"), tl.float32)
            tot = tl.zeros([HKV, GP], tl.float32)
            res = tl.zeros([HKV, GP, D], tl.float32)
            for j in tl.static_range(SPLITS):
                lse_j = tl.load(ml_ptr + base2 + j, mask=gm2, other=float("-inf"), cache_modifier=".cg")
                o_j = tl.load(mo_ptr + (base + j) * D + d3, mask=gmask, other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m, lse_j)
                live = m_new > float("-inf")
                scale = tl.where(live, tl.math.exp2(m - tl.where(live, m_new, 0.0)), 0.0)
                w = tl.where(live, tl.math.exp2(lse_j - tl.where(live, m_new, 0.0)), 0.0)
                res = res * scale[:, :, None] + w[:, :, None] * o_j
                tot = tot * scale + w
                m = m_new
            res = res / tl.where(tot > 0, tot, 1.0)[:, :, None]
            tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=gmask)
            tl.atomic_xchg(lock, 0)


def supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Power-of-two KV heads and head dim (the batched dots' shapes)."""
    hkv, d = k_cache.shape[1], k_cache.shape[2]
    return hkv & (hkv - 1) == 0 and d & (d - 1) == 0 and d >= 16


def decode_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                          lens: torch.Tensor, rows: torch.Tensor | None, new_kv: tuple | None, num_splits: int,
                          out: torch.Tensor, block_n: int = 16, num_warps: int = 8, num_stages: int = 2) -> torch.Tensor:
    """`decode_attention`'s padded-table path (table, lens, rows, new_kv) with a program per (row, split)."""
    from engine.triton_gemm import arrival_counters

    r, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    assert q.stride(2) == 1 and q.stride(1) == d and out.stride(1) == d and k_cache.is_contiguous()
    if new_kv is not None:
        k_new, v_new, new_slots = new_kv
        k_new, v_new = k_new.reshape(r, hkv * d).contiguous(), v_new.reshape(r, hkv * d).contiguous()
    else:
        k_new = v_new = new_slots = out
    mo = ml = locks = out
    if num_splits > 1:
        mo = torch.empty(r, hq, num_splits, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(r, hq, num_splits, dtype=torch.float32, device=q.device)
        locks = arrival_counters(q.device, r)
    rows = rows if rows is not None else torch.arange(r, dtype=torch.int32, device=q.device)
    _rows_kernel[(r, num_splits)](
        q, k_cache, v_cache, rows, lens, table, out, mo, ml, locks, k_new, v_new, new_slots,
        math.log2(math.e) / math.sqrt(d), q.stride(0), out.stride(0), table.stride(0), k_new.stride(0),
        v_new.stride(0), HKV=hkv, GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=d, BLOCK_N=block_n,
        SPLITS=num_splits, NEW_KV=new_kv is not None, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    return out
