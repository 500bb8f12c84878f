"""The decode step's attention over the slot table, as a CUDA-graph step runs it.

`npr::slot_decode` (per layer): Triton on the GPU, the per-row kernel (engine/triton_attention.py) or, for fork
groups, the group kernel (engine/triton_fork_attention.py), each with the step's KV write fused in; gather + SDPA
on the CPU. `SlotDecode` is the model's attention backend in such a step, `decode_step` the function the graphs
capture (and compile), and `fork_groups` / `rows_per_group` how a step's rows are grouped under shared trunks.
"""
from __future__ import annotations

import torch

from engine.qk_rope import reference


# Opaque to torch.compile, which fuses the model's norms, RoPE and SwiGLU around it. Declared as mutating
# nothing: the KV write is a side effect on the caches, which nothing else in the compiled graph reads, and
# declaring the 30-GB cache as mutated would let functionalization copy it. The split count is derived
# from the concrete batch inside, so one dynamic-shape compile serves every bucket. Off the GPU (CPU tests of
# the same host path) it is gather + SDPA; Triton is imported inside, so this module imports without it.
# With cos / sin, q and k come as projected and the op applies q/k-norm (weights None: none) and RoPE first.
@torch.library.custom_op("npr::slot_decode", mutates_args=())
def slot_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, layer: int, slots: torch.Tensor, table: torch.Tensor,
                lens: torch.Tensor, rows: torch.Tensor, q_norm: torch.Tensor | None = None,
                k_norm: torch.Tensor | None = None, eps: float = 0.0, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None, starts: torch.Tensor | None = None,
                trunks: torch.Tensor | None = None) -> torch.Tensor:
    kc, vc = k_cache[layer], v_cache[layer]
    if q.device.type != "cuda":
        if cos is not None:
            q, k = (reference(x, w, w, x.shape[1], eps, cos, sin) for x, w in ((q, q_norm), (k, k_norm)))
        return _torch_slot_decode(q, k, v, kc, vc, slots, table, lens, rows)
    from engine.triton_attention import decode_attention

    t = q.shape[0]
    rotate = None if cos is None else (q_norm, k_norm, eps, *(x.reshape(t, -1).contiguous() for x in (cos, sin)))
    if starts is not None:  # fork groups: q / k rotated first, then one program per (group, KV head)
        from engine.triton_fork_attention import fork_decode_attention
        from engine.triton_qk_rope import rotate_q_k

        if rotate is not None:
            qk = rotate_q_k(q, k, *rotate)
            q, k = qk[:, :q.shape[1]], qk[:, q.shape[1]:]
        return fork_decode_attention(q, kc, vc, table=table, lens=lens, rows=rows, new_kv=(k, v, slots),
                                     starts=starts, trunks=trunks)
    return decode_attention(q, kc, vc, table=table, lens=lens, rows=rows, new_kv=(k, v, slots), qk_norm_rope=rotate)


def _torch_slot_decode(q, k, v, kc, vc, slots, table, lens, rows):
    """The GPU kernel's contract on the CPU: each row reads the cache as it was before this step, but for its
    own new token (its last entry), taken from k / v; the new K/V are written after. A row that saw another
    row's new slot would read a stale value here too, so CPU tests of the graph path catch it."""
    w = max(int(lens.max()), 1)
    col = torch.arange(w, device=q.device)
    mask = (col < lens[:, None]) | ((lens == 0)[:, None] & (col == 0))  # an empty row reads one slot, unused
    idx = table[rows.long(), :w].long()
    kk, vv = kc[idx], vc[idx]  # [B, w, Hkv, D] copies, gathered before the write
    last = (lens - 1).clamp_min(0).long()
    b = torch.arange(q.shape[0], device=q.device)
    kk[b, last], vv[b, last] = k.to(kc.dtype), v.to(vc.dtype)
    ok = slots >= 0
    kc[slots[ok].long()], vc[slots[ok].long()] = k[ok].to(kc.dtype), v[ok].to(vc.dtype)
    group = q.shape[1] // k.shape[1]
    kk, vv = (x.transpose(1, 2).repeat_interleave(group, 1).to(q.dtype) for x in (kk, vv))  # [B, Hq, w, D]
    o = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=mask[:, None, None])
    return o[:, :, 0]


@slot_decode.register_fake
def _(q, k, v, k_cache, v_cache, layer, slots, table, lens, rows, q_norm=None, k_norm=None, eps=0.0, cos=None,
      sin=None, starts=None, trunks=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def rows_per_group(num_heads: int, num_kv_heads: int) -> int:
    """The most rows one program takes: its tile holds 16 query vectors (tl.dot's minimum), or one row's GROUP."""
    group = num_heads // num_kv_heads
    return max(1, 16 // group)


def fork_groups(keys: list, trunks: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Consecutive rows with equal keys (their shared ancestry) -> (first row of each group, its trunk), at most
    `limit` rows a group; a key of None is a row of its own (trunk 0)."""
    starts, shared = [], []
    for i, (key, t) in enumerate(zip(keys, trunks)):
        if key is None or i == 0 or keys[i - 1] != key or trunks[i - 1] != t or i - starts[-1] >= limit:
            starts.append(i)
            shared.append(t if key is not None else 0)
    return starts, shared


class SlotDecode:
    """The decode step's attention backend (`slot_decode` per layer). `rotates_qk`: the model hands it q / k as
    projected with their norm weights and cos / sin, and `decode_attention` norms and rotates them: inside its
    launch for small batches (one kernel less per layer), else by the q/k kernel just before it. groups: (starts,
    trunks) for the fork-group kernel, None for the per-row one."""

    rotates_qk = True

    def __init__(self, k_cache, v_cache, slots, table, lens, rows, groups=None):
        self.args = (k_cache, v_cache, slots, table, lens, rows)
        self.groups = groups or (None, None)

    def __call__(self, layer, q, k, v, rope=None, qk_norms=(None, None, 0.0)):
        kc, vc, slots, table, lens, rows = self.args
        cos, sin = rope if rope is not None else (None, None)
        return torch.ops.npr.slot_decode(q, k, v, kc, vc, layer, slots, table, lens, rows, *qk_norms, cos, sin,
                                         *self.groups)


def decode_step(model, ids, pos, k_cache, v_cache, slots, table, lens, rows, head_only: bool = False, groups=None):
    """Logits of one decode step over the slot table (the function that is compiled): `compute_logits`, or with
    head_only the LM head's product in the model's dtype (the same values, not copied to float32)."""
    hidden = model(ids, pos, SlotDecode(k_cache, v_cache, slots, table, lens, rows, groups))
    return model.head_logits(hidden) if head_only else model.compute_logits(hidden)
