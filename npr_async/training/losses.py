"""Policy losses by name: `sft`, `dapo`, `papo`, and any a user registers with `@register_loss("name")`.

Every loss is written as Σ_tokens ℓ_t × scale: the per-token terms ℓ_t only use quantities known when one
*group* (one prompt's samples) is complete, and `scale` holds the batch-level normalisers (batch reward std,
number of sequences, number of tokens) known only when the whole batch is in. The trainer backpropagates
Σ ℓ_t group by group while rollouts still run and multiplies the accumulated gradient by `scale` once
(DESIGN.md, "Streaming on-policy learner"). The one-shot path multiplies the loss instead: same gradient.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np
import torch

from npr_async.training.packing import Sample

LOSSES: dict[str, type["Loss"]] = {}


def register_loss(name: str):
    """Class decorator: make a `Loss` subclass available as `learner.loss: <name>`."""
    def deco(cls):
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"loss {name!r} is already registered ({LOSSES[name].__qualname__})")
        cls.name = name
        LOSSES[name] = cls
        return cls
    return deco


def get_loss(name: str, cfg) -> "Loss":
    """A registered name, or a dotted path `package.module:Class` to a user's Loss subclass."""
    if name in LOSSES:
        return LOSSES[name](cfg)
    if ":" in name:
        module, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, Loss)):
            raise ValueError(f"learner.loss={name!r} is not a Loss subclass")
        return cls(cfg)
    raise ValueError(f"learner.loss={name!r}: unknown loss; registered: {sorted(LOSSES)}")


@dataclass
class Totals:
    """What the batch normalisers need, summed over every accepted group of the step."""
    rewards: list[float] = field(default_factory=list)  # one per kept sequence
    num_sequences: int = 0
    num_tokens: int = 0  # loss tokens

    def add(self, samples: list[Sample]) -> None:
        self.rewards += [float(s.meta.get("reward", 0.0)) for s in samples]
        self.num_sequences += len(samples)
        self.num_tokens += int(sum(int(s.loss_mask.sum()) for s in samples))

    def merge(self, other: "Totals") -> None:
        self.rewards += other.rewards
        self.num_sequences += other.num_sequences
        self.num_tokens += other.num_tokens


class Loss:
    name = ""
    dropped_reasons: frozenset[str] = frozenset()  # finish reasons the structural filter removes

    def __init__(self, cfg):
        self.cfg = cfg

    def keep(self, sample: Sample) -> bool:
        return sample.meta.get("finish_reason", "stop") not in self.dropped_reasons

    def prepare_group(self, samples: list[Sample]) -> None:
        """Set `meta["coef"]` on each sample of one group (what is known per group)."""
        for s in samples:
            s.meta["coef"] = 1.0

    def token_losses(self, logp: torch.Tensor, old_logp: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """ℓ_t per target token (before `scale`); `coef` is the sample's `meta["coef"]` per token."""
        raise NotImplementedError

    def scale(self, totals: Totals) -> float:
        raise NotImplementedError


@register_loss("sft")
class SFTLoss(Loss):
    """Completion-only cross-entropy, token mean over the batch."""

    def token_losses(self, logp, old_logp, coef):
        return -logp

    def scale(self, totals):
        return 1.0 / max(totals.num_tokens, 1)


def group_centered(rewards: np.ndarray) -> np.ndarray:
    return rewards - rewards.mean() if len(rewards) else rewards


@register_loss("papo")
class PAPOLoss(Loss):
    """NPR's PAPO: −A·exp(logπ − sg(logπ)) (ratio ≡ 1, so no clip ever acts, tag tokens included),
    A = (r − group mean) / (batch std + 1e-6), token mean per sequence then mean over sequences, no KL.
    The batch std is the unbiased (torch.std) std of every kept reward of the step."""
    # structural filter: malformed, over-length or aborted samples leave the batch (not penalised)
    dropped_reasons = frozenset({"format_error", "length", "abort"})

    def prepare_group(self, samples):
        centered = group_centered(np.array([s.meta["reward"] for s in samples], dtype=np.float64))
        for s, c in zip(samples, centered):
            s.meta["coef"] = float(c) / max(int(s.loss_mask.sum()), 1)  # token mean inside the sequence

    def token_losses(self, logp, old_logp, coef):
        return -coef * torch.exp(logp - logp.detach())

    def scale(self, totals):
        r = np.array(totals.rewards, dtype=np.float64)
        std = float(r.std(ddof=1)) if len(r) > 1 else 0.0
        return 1.0 / ((std + 1e-6) * max(totals.num_sequences, 1))


def overlong_penalty(length: int, max_len: int, buffer: int, factor: float) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len − buffer, then linear down to −factor at max_len."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    if length > max_len:
        return -factor
    return factor * ((max_len - buffer) - length) / buffer


@register_loss("dapo")
class DAPOLoss(Loss):
    """DAPO: clipped surrogate with decoupled clip (1 − 0.2, 1 + 0.28) against the engine's logprobs,
    group-normalised advantage of the length-shaped reward, token mean over the whole batch.
    Dynamic sampling (dropping all-equal groups) happens in the replay buffer."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.overlong_buffer > 0 and cfg.overlong_max_tokens <= 0:
            raise ValueError("learner.overlong_buffer > 0 needs learner.overlong_max_tokens (DAPO's L_max)")

    def prepare_group(self, samples):
        c = self.cfg
        r = np.array([s.meta["reward"] + overlong_penalty(int(s.meta.get("length", 0)), c.overlong_max_tokens,
                                                          c.overlong_buffer, c.overlong_penalty)
                      for s in samples], dtype=np.float64)
        std = r.std(ddof=1) if len(r) > 1 else 0.0
        for s, a in zip(samples, (r - r.mean()) / (std + 1e-6)):
            s.meta["coef"] = float(a)

    def token_losses(self, logp, old_logp, coef):
        ratio = torch.exp(logp - old_logp)
        clipped = ratio.clamp(1.0 - self.cfg.clip_low, 1.0 + self.cfg.clip_high)
        return torch.maximum(-coef * ratio, -coef * clipped)

    def scale(self, totals):
        return 1.0 / max(totals.num_tokens, 1)
