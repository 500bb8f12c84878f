"""The `torch` KV-slot attention backend: write k/v into their slots, gather each query's context, run SDPA.

The model calls `attn(layer_idx, q, k, v)` once per layer with the flat tokens of one forward (already
RoPE'd). Before the forward the engine calls `prepare(...)` with, per sequence, the slots of its whole
visible context in any order whose tail is the sequence's new tokens (page size 1: one slot per token).
All k/v of a layer are written before any query of that layer attends, so one forward may extend a
segment and, in the same pass, a child segment that attends to it.

Decodes (one new token) and extends (prompts), each apart, are sorted by context length and grouped so that
padding at most doubles a group's context slots: one SDPA call per group with a causal-within-context mask.
One call per extend cost ~0.2 ms of host time per sequence and layer: 0.5 s for the 96 prompts a rollout admits at once (0.6B shape, H200). A Triton backend replaces this class behind the
same `prepare` / `__call__` interface.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.host_copies import upload
from engine.kv_store import KVStore


class PagedAttention:
    def __init__(self, kv: KVStore):
        self.kv = kv

    def prepare(self, seqs: list[tuple[list[int], int]], independent: bool = False) -> None:
        """seqs: per sequence (context slots, n_new); its n_new tokens are the tail of the context and appear
        in the forward's flat token order in the order given here. independent: no sequence's context holds
        another's new tokens (a backend may then write the K/V in its attention launch; unused here)."""
        dev = self.kv.k.device
        new_slots, decodes, extends, row = [], [], [], 0
        for ctx, n in seqs:
            new_slots.extend(ctx[len(ctx) - n:])
            (decodes if n == 1 else extends).append((row, n, ctx))
            row += n
        self.slot_mapping = upload(np.array(new_slots, dtype=np.int64), dev)
        # decodes and extends apart: a decode padded to a prompt's query count would waste the prompt's work
        self.calls = [_padded_call(group, dev) for part in (decodes, extends) for group in _group_by_length(part)]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        kc[self.slot_mapping] = k.to(kc.dtype)
        vc[self.slot_mapping] = v.to(vc.dtype)
        out = torch.empty_like(q)
        group = q.shape[1] // k.shape[1]  # GQA: query heads per KV head
        for q_idx, kv_idx, mask, src, dst in self.calls:
            qe = q[q_idx].transpose(1, 2)  # [B, Hq, n_max, D]
            ke = _heads(kc[kv_idx], group).to(q.dtype)  # [B, Hq, L_max, D]
            ve = _heads(vc[kv_idx], group).to(q.dtype)
            oe = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=mask)
            out[dst] = oe.transpose(1, 2).flatten(0, 1)[src]  # integer rows: a boolean index would sync the GPU
        return out


# Padded context slots per SDPA call (count x longest context): bounds the gathered, head-repeated K / V a call
# holds (32 query heads x 128 dims: 0.5 GB for K and V together) unless one sequence alone is longer.
MAX_GROUP_SLOTS = 32768


def _group_by_length(seqs: list[tuple[int, int, list[int]]]) -> list[list[tuple[int, int, list[int]]]]:
    """Sequences sorted by context length, cut into groups whose padded size (count x longest context) stays
    within twice their real context slots and within MAX_GROUP_SLOTS (a longer sequence is a group of its own):
    one SDPA call per group, padding and memory bounded."""
    groups, total = [], 0
    for e in sorted(seqs, key=lambda e: len(e[2])):
        padded = (len(groups[-1]) + 1) * len(e[2]) if groups else 0
        if groups and (padded > 2 * (total + len(e[2])) or padded > MAX_GROUP_SLOTS):
            groups.append([])
            total = 0
        if not groups:
            groups.append([])
        groups[-1].append(e)
        total += len(e[2])
    return groups


def _padded_call(group: list[tuple[int, int, list[int]]], dev: torch.device):
    """One SDPA call's inputs for sequences (flat row of the first new token, n new tokens, context slots):
    q_idx [B, n_max] flat token rows (padding repeats row 0), kv_idx [B, L_max] slots (padding: slot 0, masked),
    mask [B, 1, n_max, L_max]: query j of an extend with n new tokens and L context slots sees columns up to
    L - n + j; src / dst: the real queries' rows in the call's flattened [B * n_max] output and in the forward's
    token order. Padded queries see their row's real columns (never an empty row: no NaN); their output is
    dropped."""
    b, n_max, l_max = len(group), max(n for _, n, _ in group), max(len(c) for _, _, c in group)
    kv_idx = torch.zeros(b, l_max, dtype=torch.long)
    rows, ns, lens = (torch.tensor(v) for v in zip(*((row, n, len(c)) for row, n, c in group)))
    for i, (_, _, ctx) in enumerate(group):
        kv_idx[i, :len(ctx)] = torch.tensor(ctx, dtype=torch.long)
    j = torch.arange(n_max)
    valid = j[None, :] < ns[:, None]
    q_idx = torch.where(valid, rows[:, None] + j[None, :], 0)
    col = torch.arange(l_max)[None, None, :]
    mask = (col <= (lens - ns)[:, None, None] + j[None, :, None]) & (col < lens[:, None, None])
    src = valid.flatten().nonzero().squeeze(1)  # on the host, before the upload
    dst = q_idx.flatten()[src]
    return upload(q_idx, dev), upload(kv_idx, dev), upload(mask[:, None], dev), upload(src, dev), upload(dst, dev)


def _heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, L, Hkv, D] -> [B, Hq, L, D], repeating each KV head for its query heads."""
    x = x.transpose(1, 2)
    return x.repeat_interleave(group, dim=1) if group > 1 else x
