"""The GPU attention backend: flex_attention with a BlockMask built from segment visibility.

The mask is a function of (segment id of q, segment id of kv, ancestor table), evaluated block by block:
no dense T×T tensor exists (at 30k tokens a dense mask is GBs), and fully masked blocks (sibling steps,
other samples of the pack) are skipped. Segment ids are unique across the samples of a micro-batch, so the
ancestor table is block-diagonal and samples never see each other.
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

_compiled = None


def _flex():
    global _compiled
    if _compiled is None:  # compiled once per process: the eager flex path materialises scores.
        # Default (automatic) dynamic shapes: the second distinct micro-batch length compiles a dynamic kernel.
        _compiled = torch.compile(flex_attention)
    return _compiled


def visibility_mask_mod(segment_ids: torch.Tensor, ancestors: torch.Tensor):
    """mask_mod(b, h, q, kv): same segment and kv <= q, or seg(kv) an ancestor of seg(q)."""
    seg = segment_ids.long()

    def mask_mod(b, h, q_idx, kv_idx):
        sq, sk = seg[q_idx], seg[kv_idx]
        return ((sq == sk) & (kv_idx <= q_idx)) | ancestors[sq, sk]

    return mask_mod


def build_block_mask(segment_ids: torch.Tensor, ancestors: torch.Tensor, block_size: int = 128) -> BlockMask:
    t = segment_ids.shape[0]
    compile_it = segment_ids.is_cuda  # compiled construction avoids a dense T×T intermediate on GPU
    return create_block_mask(visibility_mask_mod(segment_ids, ancestors), B=None, H=None, Q_LEN=t, KV_LEN=t,
                             device=segment_ids.device, BLOCK_SIZE=block_size, _compile=compile_it)


class FlexAttention:
    """`attn(layer_idx, q, k, v)` over the micro-batch's own tokens under a visibility BlockMask."""

    def __init__(self, block_mask: BlockMask, compiled: bool | None = None, kernel_options: dict | None = None):
        self.block_mask = block_mask
        self.compiled = compiled
        self.kernel_options = kernel_options  # flex's Triton tile sizes etc. (None: its defaults)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        compiled = q.is_cuda if self.compiled is None else self.compiled
        fn = _flex() if compiled else flex_attention
        out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                 block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1], kernel_options=self.kernel_options)
        return out[0].transpose(0, 1)
