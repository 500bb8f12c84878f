"""FSDP2 (`fully_shard`) for a learner spanning several GPUs; the same code path runs at world size 1.

Each decoder layer is its own shard unit (all-gathered just before it runs, freed after); the root unit
(embeddings, final norm, head) is kept unsharded from forward to backward (`reshard_after_forward=False`)
because the learner calls `compute_logits` outside `forward`, in chunks. Gradients are reduce-scattered as
averages over ranks; the trainer multiplies by the world size so a loss is a sum over all ranks' samples.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def ensure_process_group() -> None:
    """A world-size-1 group when none exists (a single learner process)."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_model(model, param_dtype: torch.dtype | None = None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mp_policy": mp} if mp is not None else {}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)
    return model
