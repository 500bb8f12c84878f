"""The `torch` KV-slot attention backend: write k/v into their slots, gather each query's context, run SDPA.

The model calls `attn(layer_idx, q, k, v)` once per layer with the flat tokens of one forward (already
RoPE'd). Before the forward the engine calls `prepare(...)` with, per sequence, the slots of its whole
visible context in any order whose tail is the sequence's new tokens (page size 1: one slot per token).
All k/v of a layer are written before any query of that layer attends, so one forward may extend a
segment and, in the same pass, a child segment that attends to it.

Decodes (one new token) are padded into one batched SDPA call; extends run one SDPA call each. A Triton
backend replaces this class behind the same `prepare` / `__call__` interface.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kv_store import KVStore


class PagedAttention:
    def __init__(self, kv: KVStore):
        self.kv = kv

    def prepare(self, seqs: list[tuple[list[int], int]], independent: bool = False) -> None:
        """seqs: per sequence (context slots, n_new); its n_new tokens are the tail of the context and appear
        in the forward's flat token order in the order given here. independent: no sequence's context holds
        another's new tokens (a backend may then write the K/V in its attention launch; unused here)."""
        dev = self.kv.k.device
        new_slots, self.decode_rows, self.extends = [], [], []
        dec_ctx, row = [], 0
        for ctx, n in seqs:
            new_slots.extend(ctx[len(ctx) - n:])
            if n == 1:
                self.decode_rows.append(row)
                dec_ctx.append(ctx)
            else:
                self.extends.append((row, n, torch.tensor(ctx, dtype=torch.long, device=dev)))
            row += n
        self.slot_mapping = torch.tensor(new_slots, dtype=torch.long, device=dev)
        if dec_ctx:  # pad to the longest context; padded columns point at slot 0 and are masked out
            width = max(map(len, dec_ctx))
            idx = torch.zeros(len(dec_ctx), width, dtype=torch.long)
            mask = torch.zeros(len(dec_ctx), width, dtype=torch.bool)
            for i, c in enumerate(dec_ctx):
                idx[i, :len(c)] = torch.tensor(c, dtype=torch.long)
                mask[i, :len(c)] = True
            self.dec_idx, self.dec_mask = idx.to(dev), mask.to(dev)[:, None, None, :]
            self.dec_rows_t = torch.tensor(self.decode_rows, dtype=torch.long, device=dev)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        kc[self.slot_mapping] = k.to(kc.dtype)
        vc[self.slot_mapping] = v.to(vc.dtype)
        out = torch.empty_like(q)
        group = q.shape[1] // k.shape[1]  # GQA: query heads per KV head
        if self.decode_rows:
            qd = q[self.dec_rows_t][:, :, None, :]  # [B, Hq, 1, D]
            kd = _heads(kc[self.dec_idx], group)  # [B, Hq, L, D]
            vd = _heads(vc[self.dec_idx], group)
            od = F.scaled_dot_product_attention(qd, kd.to(q.dtype), vd.to(q.dtype), attn_mask=self.dec_mask)
            out[self.dec_rows_t] = od[:, :, 0, :]
        for row, n, ctx in self.extends:
            L = len(ctx)
            qi = q[row:row + n].transpose(0, 1)[None]  # [1, Hq, n, D]
            ki = _heads(kc[ctx][None], group).to(q.dtype)
            vi = _heads(vc[ctx][None], group).to(q.dtype)
            # query j (0-based among the n new ones) sees the context up to column L - n + j
            mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n)
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask[None, None])
            out[row:row + n] = oi[0].transpose(0, 1)
        return out


def _heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, L, Hkv, D] -> [B, Hq, L, D], repeating each KV head for its query heads."""
    x = x.transpose(1, 2)
    return x.repeat_interleave(group, dim=1) if group > 1 else x
