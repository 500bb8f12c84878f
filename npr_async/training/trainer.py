"""The learner core: forward/backward of packed micro-batches, streaming accumulation, optimizer step.

Streaming (DESIGN.md): `accumulate(group)` backpropagates Σ ℓ_t of one prompt's samples as soon as the
group arrives; `finish_step()` multiplies the accumulated gradient once by the loss's batch scale (PAPO:
1 / ((batch std + 1e-6) · #sequences)), clips and steps. `train_step(groups)` is the one-shot path: it
knows the scale first and backpropagates the scaled loss; both give the same gradient.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from engine.attention import sdpa
from npr_async.training.forward import TrainingForward, checkpointed_layers, resolve_compile
from npr_async.training.logprobs import token_logprobs
from npr_async.training.losses import Loss, Totals, get_loss
from npr_async.training.optim import build_optimizer, build_schedule
from npr_async.training.packing import MicroBatch, Sample, pack
from npr_async.training.precision import ComputeCopy, resolve_precision


class PackedMaskedAttention:
    """CPU path: SDPA with a boolean visibility mask per sample of the pack. The pack's mask is block
    diagonal, so attending sample by sample costs Σ n_i² instead of T² and gives the same result."""

    def __init__(self, mb: MicroBatch):
        self.bounds = mb.bounds
        self.masks = [mb.dense_mask(a, b) for a, b in mb.bounds]

    def __call__(self, layer_idx, q, k, v):
        return torch.cat([sdpa(q[a:b], k[a:b], v[a:b], m.to(q.device)) for (a, b), m in zip(self.bounds, self.masks)])


def attention_for(mb: MicroBatch, device: torch.device):
    """SDPA with boolean masks on CPU; a flex_attention BlockMask on GPU (never a dense mask)."""
    if device.type == "cuda":
        from npr_async.training.flex import FlexAttention, build_block_mask

        return FlexAttention(build_block_mask(mb.segment_ids, mb.ancestors))
    return PackedMaskedAttention(mb)


def microbatch_logprobs(model, mb: MicroBatch, device, autocast: bool = False,
                        forward: TrainingForward | None = None) -> torch.Tensor:
    """Logprob of every target token of `mb` (flat order of `mb.target_index`), scored at its predecessor.
    `forward` runs the layers (compiled, selectively checkpointed); None: the model's own forward."""
    mb = mb.to(device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        attn = attention_for(mb, device)
        hidden = (forward or _plain)(model, mb.input_ids, mb.positions, attn)
        return token_logprobs(hidden[mb.pred_index], model.head_weight, mb.targets,
                              compiled=forward is not None and forward.compiled)


def _plain(model, input_ids, positions, attn):
    return model(input_ids, positions, attn)


@torch.no_grad()
def score_samples(model, samples: Sequence[Sample], max_tokens: int, device=None) -> list[np.ndarray]:
    """float32[N] per sample: the model's logprob of each loss_mask token, NaN elsewhere."""
    device = torch.device(device or next(model.parameters()).device)
    out = [np.full(len(s), np.nan, dtype=np.float32) for s in samples]
    index = {id(s): k for k, s in enumerate(samples)}
    for mb in pack(list(samples), max_tokens):
        lp = microbatch_logprobs(model, mb, device).float().cpu().numpy()
        for s, (a, b) in zip(mb.samples, mb.bounds):
            sel = (mb.target_index.numpy() >= a) & (mb.target_index.numpy() < b)
            out[index[id(s)]][mb.target_index.numpy()[sel] - a] = lp[sel]
    return out


def trajectory_samples(trajectories, rewards) -> list[Sample]:
    if len(trajectories) != len(rewards):
        raise ValueError(f"{len(trajectories)} trajectories but {len(rewards)} rewards")
    return [Sample.from_trajectory(t, reward=float(r), finish_reason=t.finish_reason,
                                   length=len(t) - t.prompt_len, prompt_id=t.prompt_id, version=t.version)
            for t, r in zip(trajectories, rewards)]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _max_over_ranks(values: list[int], device) -> list[int]:
    if _world() == 1:
        return values
    t = torch.tensor(values, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _sum_over_ranks(values: list[float], device) -> list[float]:
    """The batch's metrics over every rank's share (one all-reduce)."""
    if _world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _idle_sample() -> Sample:
    """Two tokens, one target, zero weight: a rank with fewer micro-batches than the others runs it so that
    every rank issues the same FSDP collectives."""
    return Sample(np.zeros(2, np.int32), np.arange(2, dtype=np.int32), np.zeros(2, np.int32), [[]],
                  np.array([False, True]), np.zeros(2, np.float32), {"coef": 0.0})


class Trainer:
    """One learner: `accumulate(trajs, rewards)` per group, `finish_step()` per step, `save`/`load`."""

    def __init__(self, model, cfg, *, loss: str | Loss | None = None, lr: float | None = None,
                 schedule: str | None = None, warmup_steps: int | None = None, total_steps: int | None = None,
                 model_dir: str | None = None):
        self.cfg = cfg
        self.model_dir = model_dir  # config.json + tokenizer files are copied from here into checkpoints
        self.device = next(model.parameters()).device
        self.loss = loss if isinstance(loss, Loss) else get_loss(loss or cfg.loss, cfg)
        self.precision = resolve_precision(cfg.mixed_precision, self.device, cfg.fsdp)
        recompute = checkpointed_layers(model.args.num_layers, cfg.activation_checkpointing, cfg.checkpoint_layers)
        compiled = resolve_compile(cfg.compile, self.device, cfg.fsdp)
        self.forward = TrainingForward(model.args.num_layers, compiled=compiled, checkpoint_layers=recompute)
        if cfg.fsdp:  # FSDP's unshard hooks run in the modules' __call__: the model's own forward
            from npr_async.training.fsdp import shard_model

            model.gradient_checkpointing = recompute
            self.forward = None
            shard_model(model)
        elif _world() > 1:
            raise ValueError("a learner over several ranks needs learner.fsdp=true")
        # several FSDP ranks: every pass is a sequence of collectives, so the step's backward waits for
        # finish_step, where the ranks agree on the pass count (one rank streams as it goes)
        self._deferred = cfg.fsdp and _world() > 1
        self.model = model  # the fp32 master weights: optimizer, checkpoints, weight broadcast
        # bf16: forward/backward run on a bf16 copy whose gradients accumulate into the masters' fp32 .grad
        self.compute = ComputeCopy(model) if self.precision == "bf16" else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, lr or cfg.lr, cfg.weight_decay)
        self.scheduler = build_schedule(self.optimizer, schedule or cfg.schedule,
                                        cfg.warmup_steps if warmup_steps is None else warmup_steps, total_steps)
        self.step = 0
        self._reset()

    def _reset(self) -> None:
        self.totals = Totals()
        self._pending: list[Sample] = []  # several FSDP ranks: this step's kept samples, for finish_step
        self._rounds = False  # this step streams in rounds (accumulate_round)
        self._loss_sum = 0.0
        self._dropped = 0
        self._groups = 0

    # --- forward/backward ---------------------------------------------------------------------------
    def _keep(self, samples: list[Sample]) -> list[Sample]:
        kept = [s for s in samples if self.loss.keep(s) and s.loss_mask.any()]
        self._dropped += len(samples) - len(kept)
        return kept

    def _backward(self, samples: list[Sample], scale: float, more: bool = False) -> bool:
        """Backprop `samples` scaled by `scale`. FSDP: every rank calls this together and makes as many passes
        as the busiest (zero-weight padding passes); returns whether any rank said `more`."""
        model = self.compute.model if self.compute is not None else self.model
        model.train()
        mbs = pack(samples, self.cfg.micro_batch_tokens)
        real = len(mbs)
        if self.cfg.fsdp:  # every FSDP pass is a sequence of collectives: all ranks make the same number
            most, more = _max_over_ranks([real, int(more)], self.device)
            mbs += [pack([_idle_sample()], 2)[0]] * (most - real)
        for i, mb in enumerate(mbs):
            lp = microbatch_logprobs(model, mb, self.device, self.precision == "autocast", self.forward)
            old = np.concatenate([s.old_logprobs[s.loss_mask] if s.old_logprobs is not None
                                  else np.zeros(int(s.loss_mask.sum()), np.float32) for s in mb.samples])
            coef = torch.tensor([s.meta["coef"] for s in mb.samples], dtype=torch.float32)
            terms = self.loss.token_losses(lp, torch.from_numpy(old).to(self.device),
                                           coef[mb.target_sample].to(self.device))
            total = terms.sum()
            if i >= real:  # a padding pass: its collectives only (zero gradient)
                (total * 0.0).backward()
                continue
            (total * scale).backward()
            self._loss_sum += float(total.detach())
        return bool(more)

    def accumulate(self, trajectories, rewards) -> int:
        """Stream one group (the samples of one prompt): backprop its unscaled loss now. Returns #kept."""
        return self.accumulate_samples(trajectory_samples(trajectories, rewards))

    def _take_group(self, samples: list[Sample]) -> list[Sample]:
        """One group into the batch: its kept samples, prepared by the loss and counted in the totals."""
        kept = self._keep(samples)
        self._groups += 1
        if kept:
            self.loss.prepare_group(kept)
            self.totals.add(kept)
        return kept

    def accumulate_samples(self, samples: list[Sample]) -> int:
        kept = self._take_group(samples)
        if kept:
            if self._deferred:  # ranks stream different numbers of micro-batches: backprop together at the end
                self._pending += kept
            else:
                self._backward(kept, 1.0)
        return len(kept)

    def accumulate_round(self, groups: Sequence[tuple[Sequence, Sequence[float]]], more: bool) -> bool:
        """Streaming over several FSDP ranks: every rank calls this together, once per round, with the groups
        it took since the last round (maybe none) and whether it still expects groups this step; their
        unscaled gradient is accumulated now. Returns True while any rank expects more (call again)."""
        self._rounds = True
        return self._backward(self._kept_groups(groups), 1.0, more)

    def scale_gradients(self) -> tuple[Totals, float]:
        """The batch is complete: multiply the accumulated gradient once by the loss's batch scale (several FSDP
        ranks: run the step's backward passes now, already scaled, in step with the other ranks)."""
        if self._rounds and self._pending:
            raise RuntimeError("accumulate and accumulate_round mixed in one step over several ranks")
        if self._deferred and not self._rounds:
            samples, self._pending = self._pending, []
            return self._backward_scaled(samples)
        totals = self._global_totals()
        scale = self.loss.scale(totals) if totals.num_sequences else 0.0
        grad_scale = scale * (_world() if self.cfg.fsdp else 1)  # FSDP averages over ranks; we want the sum
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:  # one foreach launch instead of one multiply per parameter
            torch._foreach_mul_(grads, grad_scale)
        return totals, scale

    def finish_step(self) -> dict:
        """End of a streamed step: scale the accumulated gradient, clip, optimizer step."""
        return self._optimizer_step(*self.scale_gradients())

    def backward_batch(self, groups: Sequence[tuple[Sequence, Sequence[float]]]) -> tuple[Totals, float]:
        """One-shot gradient: all groups `(trajectories, rewards)` known up front; backprop the scaled loss."""
        return self._backward_scaled(self._kept_groups(groups))

    def _kept_groups(self, groups: Sequence[tuple[Sequence, Sequence[float]]]) -> list[Sample]:
        return [s for trajs, rewards in groups for s in self._take_group(trajectory_samples(trajs, rewards))]

    def _backward_scaled(self, samples: list[Sample]) -> tuple[Totals, float]:
        totals = self._global_totals()
        scale = self.loss.scale(totals) if totals.num_sequences else 0.0
        if samples or self.cfg.fsdp:  # micro-batches may mix groups here: the scale is already known
            self._backward(samples, scale * (_world() if self.cfg.fsdp else 1))
        return totals, scale

    def train_step(self, groups: Sequence[tuple[Sequence, Sequence[float]]]) -> dict:
        return self._optimizer_step(*self.backward_batch(groups))

    def train_samples(self, samples: list[Sample]) -> dict:
        """One-shot step over samples forming one group (SFT: the whole batch)."""
        return self._optimizer_step(*self._backward_scaled(self._take_group(samples)))

    def _global_totals(self) -> Totals:
        if _world() == 1:
            return self.totals
        parts = [None] * _world()
        dist.all_gather_object(parts, self.totals)
        merged = Totals()
        for t in parts:
            merged.merge(t)
        return merged

    def _optimizer_step(self, totals: Totals, scale: float) -> dict:
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum, dropped, groups = _sum_over_ranks([self._loss_sum, self._dropped, self._groups], self.device)
        metrics = {"step": self.step + 1, "lr": lr, "sequences": totals.num_sequences,
                   "loss_tokens": totals.num_tokens, "dropped": int(dropped), "groups": int(groups),
                   "loss": loss_sum * scale if totals.num_sequences else float("nan")}
        if totals.rewards:
            metrics["reward_mean"] = float(np.mean(totals.rewards))
        if totals.num_sequences:  # an empty batch (all filtered) leaves the weights as they are
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            metrics["grad_norm"] = float(norm)
            if math.isfinite(metrics["grad_norm"]):
                self.optimizer.step()
                if self.compute is not None:
                    self.compute.refresh()
            else:
                metrics["skipped_nonfinite"] = True
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self._reset()
        return metrics

    # --- weights and checkpoints ---------------------------------------------------------------------
    def named_weights(self):
        """(HF name, full tensor) pairs for the weight broadcast to the rollout engines."""
        for name, p in self.model.named_parameters():
            yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()

    def save(self, out_dir: str, tokenizer_dir: str | None = None) -> None:
        from npr_async.training.checkpoint import save_checkpoint

        save_checkpoint(self, out_dir, tokenizer_dir)

    def load(self, ckpt_dir: str) -> None:
        from npr_async.training.checkpoint import load_checkpoint

        load_checkpoint(self, ckpt_dir)
        if self.compute is not None:
            self.compute.refresh()
