"""Triton decode attention over token slot indices (page size 1), and the fused KV write.

Each query row attends to an arbitrary list of KV slots, given either as CSR (`indptr [R+1]`, `indices`)
or as a padded slot table (`table [R, W]`, `lens [R]`). CSR suits NPR: K branch rows that share a trunk just
list the trunk's slots again (no copy in the cache; the repeated reads mostly hit L2). Any composition of
segments is one flat index list, so the kernel never needs to know about forks or joins.

Flash-decoding: the grid is (rows, kv heads, splits). One program takes the GROUP query heads of one KV
head (GQA: K/V are read once per group, the heads padded to 16 for `tl.dot`), walks its split of the row's
slots in tiles of BLOCK_N with an online softmax, and writes a partial (out, lse); a second kernel merges
the splits. With one split the first kernel writes the output directly. The split count is a launch
constant chosen from the batch size alone, so the launch is CUDA-graph capturable (lengths stay on the GPU).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.paged_attention import PagedAttention


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # slot < 0: a padding row of a CUDA-graph bucket
        offs = tl.arange(0, BLOCK)
        m = offs < ROW
        tl.store(kc_ptr + slot * ROW + offs, tl.load(k_ptr + t * stride_k + offs, mask=m), mask=m)
        tl.store(vc_ptr + slot * ROW + offs, tl.load(v_ptr + t * stride_v + offs, mask=m), mask=m)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] -> k_cache[slot_mapping[t]], v_cache[...] (caches [S, Hkv, D]); slots < 0 skipped."""
    t = k.shape[0]
    if t == 0:
        return
    k, v = k.reshape(t, -1), v.reshape(t, -1)
    if k.stride(1) != 1:
        k = k.contiguous()
    if v.stride(1) != 1:
        v = v.contiguous()
    row = k.shape[1]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache[0].numel() == row
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                           ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4)


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, ptr_ptr, len_ptr, idx_ptr, out_ptr, mo_ptr, ml_ptr,
                   scale_log2, stride_qt, stride_qh, stride_ot, stride_oh, table_stride,
                   KV_ROW: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                   BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PADDED: tl.constexpr, PREC: tl.constexpr,
                   INDIRECT: tl.constexpr):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if PADDED:  # slot table [*, W] + lens [R] (+ the table row of each query row: ptr_ptr [R])
        if INDIRECT:
            start = tl.load(ptr_ptr + row).to(tl.int64) * table_stride
        else:
            start = row.to(tl.int64) * table_stride
        n = tl.load(len_ptr + row)
    else:  # CSR
        start = tl.load(ptr_ptr + row).to(tl.int64)
        n = (tl.load(ptr_ptr + row + 1) - start).to(tl.int32)
    per = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per
    hi = tl.minimum(lo + per, n)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    heads = kvh * GROUP + offs_h
    hmask = offs_h < GROUP
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for s in range(lo, hi, BLOCK_N):
        offs_n = s + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        slots = tl.load(idx_ptr + start + offs_n, mask=nmask, other=0).to(tl.int64)
        kv_off = slots[:, None] * KV_ROW + kvh * D + offs_d[None, :]
        k = tl.load(kc_ptr + kv_off, mask=nmask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # log2 domain: exp2 is one instruction
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + kv_off, mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]  # an empty context gives zeros, never NaN
    if SPLITS == 1:
        o_ptrs = out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
    else:
        hq = tl.num_programs(1) * GROUP
        base = (row * hq + heads) * SPLITS + split  # partials [R, Hq, SPLITS, (D)]
        tl.store(mo_ptr + base[:, None] * D + offs_d[None, :], out, mask=hmask[:, None])
        lse = tl.where(nonempty, m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(ml_ptr + base, lse, mask=hmask)


@triton.jit
def _merge_kernel(mo_ptr, ml_ptr, out_ptr, stride_ot, stride_oh, D: tl.constexpr, SPLITS: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1)
    base = (row * tl.num_programs(1) + h) * SPLITS
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    smask = offs_s < SPLITS
    lse = tl.load(ml_ptr + base + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.math.exp2(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    o = tl.load(mo_ptr + (base + offs_s)[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    tot = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty))


_NUM_SMS: dict[int, int] = {}


def _tiny(rows: int, num_kv_heads: int) -> bool:
    """A few rows (rows x KV heads well under the SM count) are latency-bound: at 1 row, 16 splits of 32-slot
    tiles took 4.9 us per layer where 32 splits of 64 took 6.1 (H200, CUDA graphs, 256-384 slots)."""
    return rows * num_kv_heads < 32


def default_block_n(rows: int, num_kv_heads: int) -> int:
    return 32 if _tiny(rows, num_kv_heads) else 64


def default_splits(rows: int, num_kv_heads: int, device: torch.device) -> int:
    """Enough programs to fill every SM once (at most 16 for tiny batches, 32 otherwise); depends only on the
    batch shape (graph-safe). More splits cost a merge pass and partial-result traffic: on an H200 one split
    beat 2-4 at 64 and 256 rows (bench/attention.py)."""
    max_splits = 16 if _tiny(rows, num_kv_heads) else 32
    if device.type != "cuda":  # the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors
        return min(max_splits, 4)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    want = -(-_NUM_SMS[idx] // max(rows * num_kv_heads, 1))
    return max(1, min(max_splits, triton.next_power_of_2(want)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                     indptr: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                     table: torch.Tensor | None = None, lens: torch.Tensor | None = None,
                     rows: torch.Tensor | None = None, num_splits: int | None = None,
                     out: torch.Tensor | None = None, block_n: int | None = None, num_warps: int = 4,
                     num_stages: int = 3) -> torch.Tensor:
    """q [R, Hq, D]; caches [S, Hkv, D]; context of row r: CSR `indices[indptr[r]:indptr[r+1]]` or the
    padded `table[rows[r], :lens[r]]` (int32 slots; rows None: table row r). Returns [R, Hq, D] in q's
    dtype; scale 1/sqrt(D)."""
    r, hq, d = q.shape
    hkv = k_cache.shape[1]
    assert hq % hkv == 0 and k_cache.shape[2] == d and q.stride(2) == 1
    padded = table is not None
    if padded:
        assert lens is not None and table.stride(1) == 1
        ptr, ln, idx, tstride = (lens if rows is None else rows), lens, table, table.stride(0)
    else:
        assert indptr is not None and indices is not None
        ptr, ln, idx, tstride = indptr, indptr, indices, 0
    out = torch.empty_like(q) if out is None else out
    if r == 0:
        return out
    splits = num_splits or default_splits(r, hkv, q.device)
    block_n = block_n or default_block_n(r, hkv)
    group = hq // hkv
    mo = ml = out  # unused placeholders when SPLITS == 1
    if splits > 1:
        mo = torch.empty(r, hq, splits, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(r, hq, splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(r, hkv, splits)](
        q, k_cache, v_cache, ptr, ln, idx, out, mo, ml, math.log2(math.e) / math.sqrt(d),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tstride,
        KV_ROW=hkv * d, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), D=d,
        BLOCK_N=block_n, SPLITS=splits, PADDED=padded, INDIRECT=padded and rows is not None,
        num_warps=num_warps, num_stages=num_stages,
        PREC="ieee" if q.dtype == torch.float32 else "tf32")  # float32 caches (tests): no tf32 rounding
    if splits > 1:
        _merge_kernel[(r, hq)](mo, ml, out, out.stride(0), out.stride(1), D=d, SPLITS=splits,
                               BLOCK_S=triton.next_power_of_2(splits), num_warps=4)
    return out


def csr(contexts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row slot lists -> (indptr int32 [R+1], indices int32 [nnz]) on `device` (one copy each)."""
    lens = torch.tensor([0] + [len(c) for c in contexts], dtype=torch.int32)
    flat = [s for c in contexts for s in c]
    return lens.cumsum(0, dtype=torch.int32).to(device), torch.tensor(flat, dtype=torch.int32).to(device)


class TritonPagedAttention(PagedAttention):
    """The `triton` backend behind PagedAttention's `prepare` / `__call__` interface.

    Every query token becomes one CSR row over the slots it may see (a decode row: its whole context; the
    j-th new token of an extend: the context up to itself), so decodes and small extends (the forced fork
    and join headers) share one kernel launch. Extends longer than `max_extend` (prompts) take the SDPA path
    of the parent class, where a prefill's O(n^2) row lists would cost more than the kernel saves.
    """

    def __init__(self, kv, max_extend: int = 64, num_splits: int | None = None):
        super().__init__(kv)
        self.max_extend, self.num_splits = max_extend, num_splits

    def prepare(self, seqs: list[tuple[list[int], int]]) -> None:
        if any(n > self.max_extend for _, n in seqs):
            self.rows_ctx = None
            return super().prepare(seqs)
        dev = self.kv.k.device
        rows, new_slots = [], []
        for ctx, n in seqs:
            new_slots.extend(ctx[len(ctx) - n:])
            rows.extend(ctx[:len(ctx) - n + j + 1] for j in range(n))
        self.rows_ctx = len(rows)
        self.slot_mapping = torch.tensor(new_slots, dtype=torch.int32).to(dev)
        self.indptr, self.indices = csr(rows, dev)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.rows_ctx is None:
            return super().__call__(layer, q, k, v)
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        store_kv(k.to(kc.dtype), v.to(vc.dtype), kc, vc, self.slot_mapping)
        return decode_attention(q.to(kc.dtype), kc, vc, indptr=self.indptr, indices=self.indices,
                                num_splits=self.num_splits).to(q.dtype)
