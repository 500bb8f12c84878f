"""Decode attention for fork groups: the rows of one group read their shared trunk once.

NPR branches forked from one point decode side by side, and each row's context is the group's trunk (prompt,
guideline, earlier steps) followed by its own slots. engine/triton_attention.py gives every (row, KV head) its
own program, so a trunk of T slots is read K times for K branches (mostly from L2, but each program still walks
it: at 384 rows x 256 slots, 3/4 of them shared by 4 rows, 82 us against 111 for unshared rows, where the
distinct bytes need ~45 at the copy bandwidth; H200, BENCHMARKS.md). Here one program per (group, KV head) puts
the GROUP query heads of all the group's rows in one tile of BLOCK_M = rows x GROUP query vectors and walks, in
one pipelined loop, the trunk once for all of them and then each row's own entries (the other rows' vectors
masked), one online softmax per query vector. The new tokens' k / v (the fused KV write, as
`decode_attention(new_kv=...)`) go to the cache first and are read back in the walk as the rows' last entries:
a row's new slot is in no other row's context, so only this program reads it.

Groups are consecutive query rows: `starts[g]` is group g's first row, its rows run to `starts[g + 1]` (clamped
to the launch's rows), at most BLOCK_M // GROUP of them (`slot_decode.rows_per_group`), and `trunks[g]` slots
lead every one of their table rows alike. A group's count and layout live on the GPU, so the launch is CUDA-graph
capturable: the grid has a program per row and KV head, and programs past the last group return at once. q and
the new k come already normed and rotated (the q/k kernel runs first, as for big batches in
engine/triton_attention.py).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.triton_attention import online_softmax_tile, unit_stride_rows


@triton.jit
def _fork_decode_kernel(q_ptr, kc_ptr, vc_ptr, rows_ptr, len_ptr, table_ptr, out_ptr, kn_ptr, vn_ptr, slot_ptr,
                        start_ptr, trunk_ptr, num_rows, scale_log2, stride_qt, stride_qh, stride_ot, stride_oh,
                        table_stride, stride_kn, stride_vn,
                        KV_ROW: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, MAX_ROWS: tl.constexpr,
                        D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    r0 = tl.load(start_ptr + g)
    if r0 < num_rows:
        nr = tl.minimum(tl.load(start_ptr + g + 1), tl.minimum(num_rows, r0 + BLOCK_M // GROUP)) - r0
        trunk = tl.load(trunk_ptr + g)
        offs_d = tl.arange(0, D)
        # the group's rows: table row, own entries after the trunk (the new token last), where they start in
        # the program's walk (the trunk first, then each row's own entries in turn)
        jr = tl.arange(0, MAX_ROWS)
        jlive = jr < nr
        base = tl.load(rows_ptr + r0 + jr, mask=jlive, other=0) * table_stride  # int32: the table < 2^31 entries
        n_own = tl.maximum(tl.load(len_ptr + r0 + jr, mask=jlive, other=0) - trunk, 0)
        ends = tl.cumsum(n_own, 0)
        begins = ends - n_own
        shift = base + trunk - begins  # walk position past the trunk -> its table entry: shift[row] + rel
        # the new tokens' k / v go to the cache first (this program's KV head); only their own row's query
        # vectors, all in this program, read them, after the barrier
        kv_new = kvh * D + offs_d[None, :]  # [1, D]: broadcast over the rows
        slot = tl.load(slot_ptr + r0 + jr, mask=jlive, other=-1).to(tl.int64)
        wmask = (slot >= 0)[:, None]
        k_new = tl.load(kn_ptr + (r0 + jr)[:, None] * stride_kn + kv_new, mask=wmask, other=0.0)
        v_new = tl.load(vn_ptr + (r0 + jr)[:, None] * stride_vn + kv_new, mask=wmask, other=0.0)
        tl.store(kc_ptr + slot[:, None] * KV_ROW + kv_new, k_new.to(kc_ptr.dtype.element_ty), mask=wmask)
        tl.store(vc_ptr + slot[:, None] * KV_ROW + kv_new, v_new.to(vc_ptr.dtype.element_ty), mask=wmask)
        tl.debug_barrier()

        offs_m = tl.arange(0, BLOCK_M)
        own = offs_m // GROUP  # the query vector's row in the group
        live = own < nr
        qrow = r0 + tl.where(live, own, 0)
        heads = kvh * GROUP + offs_m % GROUP
        q = tl.load(q_ptr + qrow[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=live[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        first = tl.sum(tl.where(jr == 0, base, 0))
        total = trunk + tl.sum(n_own)
        for s in range(0, total, BLOCK_N):  # one pipelined walk: trunk entries, then every row's own
            pos = s + tl.arange(0, BLOCK_N)
            nmask = pos < total
            in_trunk = pos < trunk
            rel = pos - trunk
            pick = (rel[:, None] >= begins[None, :]) & (rel[:, None] < ends[None, :])  # whose own entry it is
            row = tl.sum(tl.where(pick, jr[None, :], 0), 1)  # (trunk and past-the-end positions: 0, masked)
            at = tl.where(in_trunk, first + pos, tl.sum(tl.where(pick, shift[None, :], 0), 1) + rel)
            slots = tl.load(table_ptr + at, mask=nmask, other=0).to(tl.int64)
            kv_off = slots[:, None] * KV_ROW + kvh * D + offs_d[None, :]
            k = tl.load(kc_ptr + kv_off, mask=nmask[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
            sees = (in_trunk[None, :] | (own[:, None] == row[None, :])) & nmask[None, :]
            qk = tl.where(sees, qk, float("-inf"))  # a vector that has seen nothing yet stays empty
            m_i, l_i, acc = online_softmax_tile(qk, m_i, l_i, acc, vc_ptr + kv_off, nmask, PREC)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty context gives zeros, never NaN
        tl.store(out_ptr + qrow[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=live[:, None])


def fork_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, table: torch.Tensor,
                          lens: torch.Tensor, rows: torch.Tensor, new_kv: tuple, starts: torch.Tensor,
                          trunks: torch.Tensor, out: torch.Tensor | None = None, block_n: int | None = None,
                          num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """q [R, Hq, D] (normed and rotated); caches [S, Hkv, D]; row r's context: `table[rows[r], :lens[r]]`, its
    last entry its new token, whose k / v come in new_kv = (k [R, Hkv, D], v [R, Hkv, D], slots int32 [R]) and are
    written to `slots[r]` (< 0: a padding row, which must have no context: lens 0). Groups: int32 `starts`
    [>= G + 1] (first rows, ascending, then any values >= R; a group holds at most `slot_decode.rows_per_group`
    rows) and `trunks` [>= G] (table entries its rows share, fewer than each one's length). Returns [R, Hq, D] in
    q's dtype, as `decode_attention` would."""
    r, hq, d = q.shape
    hkv = k_cache.shape[1]
    k_new, v_new, new_slots = new_kv
    k_new, v_new = unit_stride_rows(k_new, r, hkv * d), unit_stride_rows(v_new, r, hkv * d)
    if (hq % hkv or q.stride(2) != 1 or table.stride(1) != 1 or len(starts) < r + 1 or len(trunks) < r
            or table.numel() >= 1 << 31):
        raise ValueError(f"fork_decode_attention: q {tuple(q.shape)} over {hkv} KV heads, table strides "
                         f"{table.stride()}, {len(starts)} starts and {len(trunks)} trunks for {r} rows (starts "
                         f"need R + 1 entries, trunks R), a table of {table.numel()} entries (fewer than 2^31)")
    out = torch.empty_like(q) if out is None else out
    if r == 0:
        return out
    group = hq // hkv
    block_m = max(16, triton.next_power_of_2(group))
    # 64-slot tiles in 3 stages: 125-127 registers for sm_90 (bench/triton_resources.py), so 4 programs per SM
    # like the per-row kernel; 128 x 2 takes 184-188. (Session 12's rollout run had 194 at 64 x 3 before the
    # walk's table lookup went int32 with one select, and no gain.)
    block_n = block_n or 64
    num_stages = num_stages or 3
    _fork_decode_kernel[(r, hkv)](
        q, k_cache, v_cache, rows, lens, table, out, k_new, v_new, new_slots, starts, trunks, r,
        math.log2(math.e) / math.sqrt(d), q.stride(0), q.stride(1), out.stride(0), out.stride(1), table.stride(0),
        k_new.stride(0), v_new.stride(0),
        KV_ROW=hkv * d, GROUP=group, BLOCK_M=block_m, MAX_ROWS=max(2, triton.next_power_of_2(block_m // group)),
        D=d, BLOCK_N=block_n, PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps,
        num_stages=num_stages)
    return out

