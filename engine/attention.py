"""Attention backends: the model calls `attn(layer_idx, q, k, v)` and never sees masks, caches or kernels.

Protocol (every backend):
    q [T, Hq, Dh], k / v [T, Hkv, Dh]  -- this forward's tokens, after q/k-norm and RoPE, Hq % Hkv == 0
    returns [T, Hq, Dh] in q's dtype; softmax scale 1/sqrt(Dh) (all supported models use it).
A backend is set up once per forward with whatever it needs (a mask here; KV slots and per-token context
slot lists in the engine's paged backend; a flex_attention BlockMask in the learner's GPU backend; a Triton
decode kernel later) and is called once per layer, in layer order. A backend with a KV cache stores k/v
under `layer_idx` before attending, which is why RoPE is applied first: positions live in the cache.

`MaskedAttention` is the reference: dense SDPA with a boolean mask over the forward's own tokens. It is the
learner's CPU path and what `score` uses. Eager attention adds masks and so silently mishandles boolean
ones; SDPA takes booleans as "True = may attend".
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         is_causal: bool = False) -> torch.Tensor:
    """SDPA over flat tokens: q [Tq, Hq, Dh], k/v [Tk, Hkv, Dh], mask bool [Tq, Tk] -> [Tq, Hq, Dh].

    GQA by repeating k/v to Hq heads: torch documents `enable_gqa` as experimental and supported only by
    the flash and math kernels, and flash takes no mask, so a masked call would drop to math anyway; with
    repeated heads the memory-efficient kernel (which takes bool masks) stays eligible on GPU.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        rep = hq // hkv
        k = k[:, :, None].expand(-1, -1, rep, -1).reshape(k.shape[0], hq, k.shape[2])
        v = v[:, :, None].expand(-1, -1, rep, -1).reshape(v.shape[0], hq, v.shape[2])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=None if mask is None else mask[None, None], is_causal=is_causal)
    return out[0].transpose(0, 1)


class MaskedAttention:
    """Dense attention among the forward's tokens under `mask: bool[T, T]` (True = may attend)."""

    def __init__(self, mask: torch.Tensor):
        if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
            raise ValueError(f"mask must be bool [T, T], got {mask.dtype} {tuple(mask.shape)}")
        if not bool(mask.diagonal().all()):
            raise ValueError("every token must see itself (a row with no visible key gives NaN)")
        self.mask = mask

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != self.mask.shape[0]:
            raise ValueError(f"{q.shape[0]} tokens but the mask is for {self.mask.shape[0]}")
        return sdpa(q, k, v, self.mask.to(q.device))


class CausalAttention:
    """Plain causal attention over one sequence (no mask tensor is materialised)."""

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, None, is_causal=True)


def causal_mask(lengths: Sequence[int], device=None) -> torch.Tensor:
    """Block-diagonal causal mask for sequences packed back to back."""
    return block_diagonal([torch.ones(n, n, dtype=torch.bool, device=device).tril() for n in lengths])


def block_diagonal(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pack per-sequence bool masks: tokens never see another sequence of the pack."""
    masks = [torch.as_tensor(m, dtype=torch.bool) for m in masks]
    n = sum(m.shape[0] for m in masks)
    out = torch.zeros(n, n, dtype=torch.bool, device=masks[0].device if masks else None)
    i = 0
    for m in masks:
        out[i:i + m.shape[0], i:i + m.shape[0]] = m
        i += m.shape[0]
    return out


def packed_visibility_mask(items: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]) -> torch.Tensor:
    """Mask for a pack of trajectories given per item `(segment_ids, parents)` (NPR segment visibility)."""
    from npr_async.structure import visibility_mask  # one definition of visibility, shared with the learner

    return block_diagonal([torch.as_tensor(visibility_mask(seg, par)) for seg, par in items])
