"""Triton decode attention over token slot indices (page size 1), and the fused KV write.

Each query row attends to an arbitrary list of KV slots, given either as CSR (`indptr [R+1]`, `indices`)
or as a padded slot table (`table [R, W]`, `lens [R]`). CSR suits NPR: K branch rows that share a trunk just
list the trunk's slots again (no copy in the cache; the repeated reads mostly hit L2). Any composition of
segments is one flat index list, so the kernel never needs to know about forks or joins.

Flash-decoding: the grid is (rows, kv heads, splits). One program takes the GROUP query heads of one KV
head (GQA: K/V are read once per group, the heads padded to 16 for `tl.dot`), walks its split of the row's
slots in tiles of BLOCK_N with an online softmax, and writes a partial (out, lse); the last split of a
(row, KV head) to finish merges them (an arrival counter, as engine/triton_gemm.py's split-K), so one launch
does it all. The split count is a launch constant chosen from the batch size alone, so the launch is
CUDA-graph capturable (lengths stay on the GPU). A decode step hands the kernel its new k/v (`new_kv`): the
KV write is fused into the same launch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from engine.host_copies import upload
from engine.paged_attention import PagedAttention
from engine.triton_qk_rope import joined, normed_rotated


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
    k, v = unit_stride_rows(k, t, -1), unit_stride_rows(v, t, -1)
    row = k.shape[1]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache[0].numel() == row
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                           ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4)


@triton.jit
def online_softmax_tile(qk, m_i, l_i, acc, v_ptrs, vmask, PREC: tl.constexpr):
    """One tile of the online softmax in the log2 domain: scores qk [M, N] (masked entries -inf), values loaded
    from v_ptrs [N, D] (after the scores, as the pipeliner saw it before this was shared). Returns the running
    max, sum and output; a vector that has seen only masked entries stays empty (max -inf, sum 0)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=vmask[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, ptr_ptr, len_ptr, idx_ptr, out_ptr, mo_ptr, ml_ptr, lock_ptr,
                   kn_ptr, vn_ptr, slot_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, eps, scale_log2, stride_qt, stride_qh,
                   stride_ot, stride_oh, table_stride, stride_kn, stride_vn, stride_cos, stride_sin,
                   KV_ROW: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                   BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PADDED: tl.constexpr, PREC: tl.constexpr,
                   INDIRECT: tl.constexpr, NEW_KV: tl.constexpr, ROTATE: tl.constexpr, NORM: tl.constexpr):
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
    # NEW_KV: the row's last context entry is its new token, whose k/v come in registers (kn/vn) rather than
    # from the cache: the program whose range holds it writes them to the cache (the fused KV write) and
    # attends to them directly, so no program reads a slot that this launch writes.
    cache_hi = tl.minimum(hi, n - 1) if NEW_KV else hi

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    heads = kvh * GROUP + offs_h
    hmask = offs_h < GROUP
    q_ptrs = q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    if ROTATE:  # q and the new k come as projected: q/k-norm (NORM) and RoPE here (engine/triton_qk_rope.py)
        cos_row, sin_row = cos_ptr + row * stride_cos, sin_ptr + row * stride_sin
        q1, q2 = normed_rotated(q_ptr + row * stride_qt + heads[:, None] * stride_qh, hmask[:, None], wq_ptr, wk_ptr,
                                offs_h[:, None] >= 0, cos_row, sin_row, eps, NORM, D)
        q = joined(q1, q2)
    else:
        q = tl.load(q_ptrs, mask=hmask[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for s in range(lo, cache_hi, BLOCK_N):
        offs_n = s + tl.arange(0, BLOCK_N)
        nmask = offs_n < cache_hi
        slots = tl.load(idx_ptr + start + offs_n, mask=nmask, other=0).to(tl.int64)
        kv_off = slots[:, None] * KV_ROW + kvh * D + offs_d[None, :]
        k = tl.load(kc_ptr + kv_off, mask=nmask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # log2 domain: exp2 is one instruction
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_i, l_i, acc = online_softmax_tile(qk, m_i, l_i, acc, vc_ptr + kv_off, nmask, PREC)
    if NEW_KV:  # only the program that owns the new token reads (and rotates) it: hoisting this before the loop
        # for every program cost 5.5 us a layer at 64 rows in the engine (BENCHMARKS.md, session 9)
        if (n > 0) & (lo <= n - 1) & (n - 1 < hi):
            kn_ptrs = kn_ptr + row * stride_kn + kvh * D + offs_d
            if ROTATE:
                one = tl.zeros([1, 1], tl.int32)  # a single vector: M = 1, never a q head
                k1, k2 = normed_rotated(kn_ptr + row * stride_kn + kvh * D + one, one == 0, wq_ptr, wk_ptr, one != 0,
                                        cos_row, sin_row, eps, NORM, D)
                k_new = tl.reshape(joined(k1, k2), [D])
            else:
                k_new = tl.load(kn_ptrs)
            v_new = tl.load(vn_ptr + row * stride_vn + kvh * D + offs_d)
            slot = tl.load(slot_ptr + row).to(tl.int64)
            if slot >= 0:  # < 0: a padding row of a CUDA-graph bucket writes nothing
                tl.store(kc_ptr + slot * KV_ROW + kvh * D + offs_d, k_new.to(kc_ptr.dtype.element_ty))
                tl.store(vc_ptr + slot * KV_ROW + kvh * D + offs_d, v_new.to(vc_ptr.dtype.element_ty))
            k_new = k_new.to(kc_ptr.dtype.element_ty).to(tl.float32)  # as the cache holds it
            v_new = v_new.to(vc_ptr.dtype.element_ty).to(tl.float32)
            qk1 = tl.sum(q.to(tl.float32) * k_new[None, :], 1) * scale_log2
            m_new = tl.maximum(m_i, qk1)
            p1 = tl.math.exp2(qk1 - m_new)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + p1
            acc = acc * alpha[:, None] + p1[:, None] * v_new[None, :]
            m_i = m_new
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]  # an empty context gives zeros, never NaN
    o_ptrs = out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    if SPLITS == 1:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
    else:
        # Every split stores its partial (out, lse) and counts itself in on the (row, kv head) lock; the last
        # to arrive merges all partials in split order (deterministic: no float atomics) and re-arms the lock
        # (the same scheme as engine/triton_gemm.py's split-K), so one launch does what a merge kernel did.
        hq = tl.num_programs(1) * GROUP
        base = (row * hq + heads) * SPLITS  # partials [R, Hq, SPLITS, (D)]
        lse = tl.where(nonempty, m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(mo_ptr + (base + split)[:, None] * D + offs_d[None, :], out, mask=hmask[:, None])
        tl.store(ml_ptr + base + split, lse, mask=hmask)
        tl.debug_barrier()
        lock = lock_ptr + row * tl.num_programs(1) + kvh
        last = tl.atomic_add(lock, 1, sem="acq_rel") == SPLITS - 1
        if last:
            m = tl.full([BLOCK_H], float("-inf"), tl.float32)
            tot = tl.zeros([BLOCK_H], tl.float32)
            res = tl.zeros([BLOCK_H, D], tl.float32)
            for j in tl.static_range(SPLITS):  # online merge over the splits, in order
                lse_j = tl.load(ml_ptr + base + j, mask=hmask, other=float("-inf"), cache_modifier=".cg")
                o_j = tl.load(mo_ptr + (base + j)[:, None] * D + offs_d[None, :], mask=hmask[:, None], other=0.0,
                              cache_modifier=".cg")
                m_new = tl.maximum(m, lse_j)
                live = m_new > float("-inf")
                scale = tl.where(live, tl.math.exp2(m - tl.where(live, m_new, 0.0)), 0.0)
                w = tl.where(live, tl.math.exp2(lse_j - tl.where(live, m_new, 0.0)), 0.0)
                res = res * scale[:, None] + w[:, None] * o_j
                tot = tot * scale + w
                m = m_new
            res = res / tl.where(tot > 0, tot, 1.0)[:, None]
            tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
            tl.atomic_xchg(lock, 0)


_NUM_SMS: dict[int, int] = {}


def _tiny(rows: int, num_kv_heads: int) -> bool:
    """A few rows (rows x KV heads well under the SM count) are latency-bound: at 1 row, 16 splits of 32-slot
    tiles took 4.9 us per layer where 32 splits of 64 took 6.1 (H200, CUDA graphs, 256-384 slots)."""
    return rows * num_kv_heads < 32


# Programs (rows x KV heads) below which the launch rotates q / k itself (see `rotates_inside`).
ROTATE_INSIDE_BELOW = 1024


def rotates_inside(rows: int, num_kv_heads: int) -> bool:
    """Whether a launch with `qk_norm_rope` norms and rotates q / k in its own programs, saving the q/k kernel's
    launch: below ROTATE_INSIDE_BELOW programs, so up to 64 rows of 8 KV heads. At 64 rows the in-launch rotation
    takes 154 registers instead of 124 (3 programs per SM instead of 4), yet attention 0.891 ms per step against
    the q/k kernel's 0.117 + attention's 0.846 (H200, uncompiled steps 5.37 vs 5.46 ms, session 10:
    BENCHMARKS.md); at 256 rows the q/k kernel first (the prologue cost +9.2 us per layer there, session 7)."""
    return rows * num_kv_heads < ROTATE_INSIDE_BELOW


def default_block_n(rows: int, num_kv_heads: int) -> int:
    """32-slot tiles up to 16 rows of 8 KV heads, 128 from 128 rows on (at 256 rows x 256-384 slots: 71 vs
    74 us and 103 vs 107 us per layer against 64, H200 in a CUDA graph), 64 between (best at 64 rows)."""
    programs = rows * num_kv_heads
    return 32 if programs < 256 else 128 if programs >= 1024 else 64


def default_stages(rows: int, num_kv_heads: int) -> int:
    """A 3-stage pipeline for 64-slot tiles; 2 for 32 (5.7 vs 6.0 us per layer at 1 row) and 128 (as fast,
    and two 64-KB K/V stages also fit an A100's shared memory)."""
    return 3 if default_block_n(rows, num_kv_heads) == 64 else 2


def default_splits(rows: int, num_kv_heads: int, device: torch.device) -> int:
    """Enough programs to fill every SM twice (at most 16 for tiny batches, 32 otherwise); depends only on the
    batch shape (graph-safe). More splits cost partial-result traffic and the last split's merge: on an H200
    (fused KV write and merge, CUDA graph) 4 splits of 32 slots were best at 16 rows, one split at 64 and 256."""
    max_splits = 16 if _tiny(rows, num_kv_heads) else 32
    if device.type != "cuda":  # the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors
        return min(max_splits, 4)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    want = -(-2 * _NUM_SMS[idx] // max(rows * num_kv_heads, 1))
    return max(1, min(max_splits, triton.next_power_of_2(want)))


def unit_stride_rows(t: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """t as [rows, width] with unit stride along a row (the kernels' layout of a step's new k / v): a view of a
    q/k/v projection's output as it comes, a copy only when its last dim is strided."""
    t = t.reshape(rows, width)
    return t if t.stride(1) == 1 else t.contiguous()


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                     indptr: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                     table: torch.Tensor | None = None, lens: torch.Tensor | None = None,
                     rows: torch.Tensor | None = None, new_kv: tuple | None = None, qk_norm_rope: tuple | None = None,
                     num_splits: int | None = None, out: torch.Tensor | None = None, block_n: int | None = None,
                     num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """q [R, Hq, D]; caches [S, Hkv, D]; context of row r: CSR `indices[indptr[r]:indptr[r+1]]` or the
    padded `table[rows[r], :lens[r]]` (int32 slots; rows None: table row r). Returns [R, Hq, D] in q's
    dtype; scale 1/sqrt(D).
    new_kv = (k [R, Hkv, D], v [R, Hkv, D], slots int32 [R]): the fused KV write of a decode step. Each row's
    last context entry is then its new token: k[r], v[r] are written to `slots[r]` (< 0: not written) and
    attended to from registers, never read back from the cache. A row's context must not hold another row's
    new slot (true of decoding: a token is seen by later steps only).
    qk_norm_rope = (q_weight [D] | None, k_weight [D] | None, eps, cos [R, D], sin [R, D]), with new_kv only: q and
    the new k come as projected, and engine/qk_rope.py's q/k-norm (weights None: none) and RoPE apply to them
    before they are used (the cache holds the rotated k): inside this launch where `rotates_inside` says so,
    else by the q/k kernel just before it."""
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
    if new_kv is not None:
        k_new, v_new, new_slots = new_kv
        k_new, v_new = unit_stride_rows(k_new, r, hkv * d), unit_stride_rows(v_new, r, hkv * d)
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and new_slots.shape == (r,)
    else:
        k_new = v_new = new_slots = out  # unused placeholders
    rotate = qk_norm_rope is not None  # q/k-norm + RoPE in this launch
    wq, wk, eps, cos, sin = qk_norm_rope if rotate else (None, None, 0.0, None, None)
    if rotate:
        bad_weights = (wq is None) != (wk is None) or (wq is not None and (wq.shape != (d,) or wk.shape != (d,)))
        bad_rope = cos.shape != (r, d) or sin.shape != (r, d) or cos.stride(1) != 1 or sin.stride(1) != 1 or d % 2
        if new_kv is None or bad_weights or bad_rope:
            raise ValueError(f"decode_attention: qk_norm_rope needs new_kv, cos / sin [R, D] = {(r, d)} with unit "
                             f"stride along D (got {tuple(cos.shape)} / {tuple(sin.shape)}), an even D and both norm "
                             f"weights [D] or neither")
        if not rotates_inside(r, hkv):  # the q/k kernel first, then a launch on rotated q / k
            from engine.triton_qk_rope import rotate_q_k

            qk = rotate_q_k(q, k_new.view(r, hkv, d), wq, wk, eps, cos, sin)
            q, k_new, rotate = qk[:, :hq], qk[:, hq:].reshape(r, hkv * d), False
    norm = rotate and wq is not None
    if not norm:
        wq = wk = out  # unused placeholders
    if not rotate:
        cos = sin = out
    splits = num_splits or default_splits(r, hkv, q.device)
    block_n = block_n or default_block_n(r, hkv)
    num_stages = num_stages or default_stages(r, hkv)
    group = hq // hkv
    mo = ml = locks = out  # unused placeholders when SPLITS == 1
    if splits > 1:
        from engine.triton_gemm import arrival_counters

        mo = torch.empty(r, hq, splits, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(r, hq, splits, dtype=torch.float32, device=q.device)
        locks = arrival_counters(q.device, r * hkv)
    _decode_kernel[(r, hkv, splits)](
        q, k_cache, v_cache, ptr, ln, idx, out, mo, ml, locks, k_new, v_new, new_slots, wq, wk, cos, sin, eps,
        math.log2(math.e) / math.sqrt(d), q.stride(0), q.stride(1), out.stride(0), out.stride(1), tstride,
        k_new.stride(0), v_new.stride(0), cos.stride(0), sin.stride(0),
        KV_ROW=hkv * d, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), D=d,
        BLOCK_N=block_n, SPLITS=splits, PADDED=padded, INDIRECT=padded and rows is not None,
        NEW_KV=new_kv is not None, ROTATE=rotate, NORM=norm, num_warps=num_warps,
        num_stages=num_stages,
        PREC="ieee" if q.dtype == torch.float32 else "tf32")  # float32 caches (tests): no tf32 rounding
    return out


def csr(contexts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row slot lists -> (indptr int32 [R+1], indices int32 [nnz]) on `device` (one copy each)."""
    lens = np.array([0] + [len(c) for c in contexts], dtype=np.int32)
    flat = np.fromiter((s for c in contexts for s in c), dtype=np.int32, count=int(lens.sum()))
    return upload(np.cumsum(lens, dtype=np.int32), device), upload(flat, device)


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

    def prepare(self, seqs: list[tuple[list[int], int]], independent: bool = False) -> None:
        if any(n > self.max_extend for _, n in seqs):
            self.rows_ctx = None
            return super().prepare(seqs)
        dev = self.kv.k.device
        rows, new_slots = [], []
        for ctx, n in seqs:
            new_slots.extend(ctx[len(ctx) - n:])
            rows.extend(ctx[:len(ctx) - n + j + 1] for j in range(n))
        self.rows_ctx = len(rows)
        # the KV write fuses into the attention launch when each row's new token is its last entry and no row
        # sees another row's new token (it would read the slot while that row's program writes it)
        self.fused_write = independent and all(n == 1 for _, n in seqs)
        self.slot_mapping = upload(np.array(new_slots, dtype=np.int32), dev)
        self.indptr, self.indices = csr(rows, dev)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.rows_ctx is None:
            return super().__call__(layer, q, k, v)
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        k, v = k.to(kc.dtype), v.to(vc.dtype)
        new_kv = (k, v, self.slot_mapping) if self.fused_write else None
        if new_kv is None:  # an extend's later tokens read its earlier new tokens from the cache
            store_kv(k, v, kc, vc, self.slot_mapping)
        return decode_attention(q.to(kc.dtype), kc, vc, indptr=self.indptr, indices=self.indices,
                                new_kv=new_kv, num_splits=self.num_splits).to(q.dtype)
