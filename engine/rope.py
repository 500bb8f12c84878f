"""Rotary position embedding as HF computes it (default, linear and llama3 scaling), with a cos/sin table
indexed by position: NPR branches reuse positions, so positions are arbitrary per token."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from engine.model import ModelArgs


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies as HF computes them (default, linear and llama3 scaling)."""
    dim = args.head_dim
    ar = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float()  # cpu: also under a meta-device init
    inv = 1.0 / (args.rope_theta ** (ar / dim))
    sc = args.rope_scaling
    if sc is None:
        return inv
    kind = sc["rope_type"]
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")


class Rotary(nn.Module):
    """RoPE with a cos/sin table indexed by position; positions may be arbitrary (forks reuse them)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)  # float32 [Dh/2]
        self._cos_sin: torch.Tensor | None = None  # [n, 2, Dh/2] float32
        self._pinned = False  # True after an explicit ensure(): no host reads of positions any more

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` would round the frequencies: recompute them in float32 wherever they landed.
        before = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq is before:  # a no-op (e.g. .to() the device it is on): keep the pinned table, so
            return self  # CUDA graphs and compiled steps that captured it stay valid
        self.inv_freq = rope_inv_freq(self.args).to(self.inv_freq.device)
        self._cos_sin, self._pinned = None, False
        return self

    def _grow(self, n: int, device) -> torch.Tensor:
        t = self._cos_sin
        if t is None or t.shape[0] < n or t.device != device:
            size = max(n, 2 * t.shape[0] if t is not None and t.device == device else 0, 256)
            # Same arithmetic as HF: float(position) * inv_freq in float32.
            freqs = torch.arange(size, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)[None]
            self._cos_sin = t = torch.stack([freqs.cos(), freqs.sin()], dim=1)
        return t

    def ensure(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Cover positions < n and promise they stay below: later forwards never sync on positions.max()
        (needed for CUDA-graph capture). Positions beyond the table then fail an index check."""
        t = self._grow(n, torch.device(device) if device is not None else self.inv_freq.device)
        self._pinned = True
        return t

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, Dh] for positions [T]: computed once per forward and shared by all layers."""
        t = self._cos_sin
        if t is None or t.device != positions.device:
            self._pinned = False
        if not self._pinned:  # one host sync per forward
            t = self._grow(int(positions.max()) + 1 if positions.numel() else 1, positions.device)
        cs = t[positions].to(dtype)  # [T, 2, Dh/2]
        cos = torch.cat([cs[:, 0], cs[:, 0]], -1)[:, None]
        sin = torch.cat([cs[:, 1], cs[:, 1]], -1)[:, None]
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, Dh] rotated in HF's rotate_half layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin
