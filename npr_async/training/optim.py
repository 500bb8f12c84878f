"""AdamW and the learning-rate schedules: constant and cosine, both with linear warm-up."""
from __future__ import annotations

import math

import torch


def build_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay on every parameter, as verl/NPR do (no norm/bias exclusion). foreach=False keeps the update
    # order fixed, which the bitwise resume test relies on; the fused kernels are a GPU-only win.
    params = list(params)
    kw = {"fused": True} if params and all(p.is_cuda for p in params) else {"foreach": False}
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, **kw)


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int | None, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        if not total_steps:
            raise ValueError("the cosine schedule needs total_steps")
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r} (constant | cosine)")


def build_schedule(optimizer, schedule: str, warmup_steps: int, total_steps: int | None):
    if schedule == "cosine" and not total_steps:
        raise ValueError("learner.schedule=cosine needs the number of steps (controller.steps)")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, schedule, warmup_steps, total_steps))
