"""Mixed precision for the learner: a low-precision compute copy of the fp32 master model.

Autocast keeps fp32 weights and casts them to bf16 inside every op, in forward and again in backward
(and once more per recomputed layer). Instead the learner keeps two models: the fp32 master (what the
optimizer, checkpoints and the weight broadcast see) and a bf16 copy that runs forward and backward. The
copy is refreshed from the master once per optimizer step. Each copy parameter's gradient is added into
its master's fp32 `.grad` as soon as backward has accumulated it, then freed, so gradients accumulate
across micro-batches and groups in fp32 (streaming PAPO scales them once at the end) and at most one
layer's low-precision gradients exist at a time.
"""
from __future__ import annotations

import torch


def resolve_precision(setting: str, device: torch.device, fsdp: bool) -> str:
    """learner.mixed_precision -> "bf16" (compute copy), "autocast" or "off"."""
    if setting not in ("auto", "bf16", "autocast", "off"):
        raise ValueError(f"learner.mixed_precision must be auto, bf16, autocast or off, got {setting!r}")
    if setting == "auto":
        if device.type != "cuda":
            return "off"
        return "autocast" if fsdp else "bf16"
    if setting == "bf16" and fsdp:
        raise ValueError("learner.mixed_precision=bf16 (a compute copy) needs fsdp=false; with FSDP use autocast")
    return setting


class ComputeCopy:
    """`copy.model` computes in `dtype`; its gradients land in `master`'s parameters' fp32 `.grad`."""

    def __init__(self, master: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        device = next(master.parameters()).device
        with torch.device("meta"):
            model = type(master)(master.args)
        # cast on the meta device, then allocate: no fp32 copy on the way; the RoPE table is rebuilt in fp32
        self.model = model.to(dtype).to_empty(device=device).train()
        mine, theirs = dict(self.model.named_parameters()), dict(master.named_parameters())
        if mine.keys() != theirs.keys():
            raise ValueError(f"compute copy parameters differ from the master's: {sorted(mine.keys() ^ theirs.keys())}")
        self.pairs = [(theirs[n], p) for n, p in mine.items()]
        for m, p in self.pairs:
            if not m.requires_grad:
                p.requires_grad_(False)
            else:
                p.register_post_accumulate_grad_hook(_into_master(m))
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the master weights into the copy (after each optimizer step and after loading weights)."""
        masters, copies = zip(*self.pairs)
        torch._foreach_copy_(list(copies), list(masters))


def _into_master(master: torch.nn.Parameter):
    def hook(p: torch.Tensor) -> None:
        g = p.grad
        p.grad = None
        if master.grad is None:
            master.grad = g.to(master.dtype, copy=True)
        else:
            master.grad.add_(g)
    return hook
