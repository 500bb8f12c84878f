"""The learner's forward pass: the model's own decoder layers, compiled per layer and selectively checkpointed.

Each layer runs as its two halves around attention (`DecoderLayer.attention_inputs`: norm, q/k/v, q/k-norm,
RoPE; `attention_output_mlp`: o_proj, residual, norm, SwiGLU, residual). With `compiled=True` each half is
one `torch.compile`d function for all layers (the layer module is an argument, so its weights are graph
inputs and the 36 layers of a Qwen3-4B share one compilation) and the token count is marked dynamic, so
micro-batches of any length reuse it. The attention backend (flex BlockMask on GPU, compiled on its own)
is called between the halves and never traced: its mask closure changes every micro-batch.

Activation checkpointing recomputes the first `checkpoint_layers` layers in backward (all of them with
-1); any k layers save the same memory at the peak (the end of forward), each costs one layer's forward.
"""
from __future__ import annotations

import torch
import torch._functorch.config  # noqa: F401  (partitioner options, `_partitioner_options`)
from torch.utils.checkpoint import checkpoint


def _attention_inputs(layer, x, cos, sin):
    return layer.attention_inputs(x, (cos, sin))


def _attention_output_mlp(layer, x, o):
    return layer.attention_output_mlp(x, o)


_compiled: dict = {}


def _partitioner_options() -> dict:
    """Let the compiler recompute pointwise results (the normed inputs, silu(gate)·up) in backward even where
    backward must materialise them: 12k fewer saved values per token and layer on the Qwen3-4B shape (~14 GB
    at 16k tokens) for one cheap pointwise kernel each. Read when the halves compile (their first call)."""
    cfg = torch._functorch.config
    return {"ban_recompute_materialized_backward": False} if hasattr(cfg, "ban_recompute_materialized_backward") else {}


def _compiled_half(fn):
    if fn not in _compiled:  # one compilation per process (bench variants and trainers share it)
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def compiled_versions() -> dict[str, int]:
    """How many compiled versions each compiled learner function holds: 1 each when no micro-batch length,
    layer or chunk size caused a recompile (0: not compiled yet; empty dict if torch cannot tell)."""
    from npr_async.training import logprobs

    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return {}
    fns = (_attention_inputs, _attention_output_mlp, logprobs._lse_and_target, logprobs._logits_grad)
    return {f.__name__.strip("_"): len(_debug_get_cache_entry_list(f.__code__)) for f in fns}


def checkpointed_layers(num_layers: int, enabled: bool, count: int) -> frozenset[int]:
    """Indices of the layers to recompute: none when off, else the first `count` (-1: all)."""
    if count < -1:
        raise ValueError(f"checkpoint_layers must be -1 (all) or >= 0, got {count}")
    if not enabled:
        return frozenset()
    return frozenset(range(num_layers if count == -1 else min(count, num_layers)))


def resolve_compile(setting, device: torch.device, fsdp: bool) -> bool:
    """learner.compile: true / false / "auto" (on for CUDA without FSDP: FSDP's unshard hooks run on the
    layer's own `__call__`, which the compiled halves bypass)."""
    if setting == "auto":
        return device.type == "cuda" and not fsdp
    if setting is True and fsdp:
        raise ValueError("learner.compile=true is not supported with learner.fsdp=true (use auto or false)")
    if not isinstance(setting, bool):
        raise ValueError(f"learner.compile must be true, false or auto, got {setting!r}")
    return setting


class TrainingForward:
    """`forward(model, input_ids, positions, attn) -> hidden [T, D]`, the same math as `CausalLM.forward`."""

    def __init__(self, num_layers: int, *, compiled: bool = False, checkpoint_layers: frozenset[int] = frozenset()):
        self.compiled = compiled
        self.checkpoint_layers = frozenset(checkpoint_layers)
        bad = sorted(i for i in self.checkpoint_layers if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"checkpoint layers {bad} outside 0..{num_layers - 1}")
        self.pre = _compiled_half(_attention_inputs) if compiled else _attention_inputs
        self.post = _compiled_half(_attention_output_mlp) if compiled else _attention_output_mlp
        self.partitioner = _partitioner_options() if compiled else {}

    def layer(self, layer, x, cos, sin, attn):
        if not self.compiled:  # the module's own __call__ (keeps FSDP's hooks)
            return layer(x, (cos, sin), attn)
        with torch._functorch.config.patch(self.partitioner):
            q, k, v = self.pre(layer, x, cos, sin)
        o = attn(layer.self_attn.layer_idx, q, k, v)
        torch._dynamo.maybe_mark_dynamic(o, 0)
        with torch._functorch.config.patch(self.partitioner):
            return self.post(layer, x, o)

    def __call__(self, model, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"flat tokens expected: input_ids {tuple(input_ids.shape)}, positions {tuple(positions.shape)}")
        m = model.model
        x = m.embed_tokens(input_ids)
        cos, sin = m.rotary_emb.cos_sin(positions, x.dtype)
        if self.compiled:
            for t in (x, cos, sin):  # any micro-batch length: one compilation, not one per length
                torch._dynamo.maybe_mark_dynamic(t, 0)
        recompute = torch.is_grad_enabled()
        for i, layer in enumerate(m.layers):
            if recompute and i in self.checkpoint_layers:
                x = checkpoint(self.layer, layer, x, cos, sin, attn, use_reentrant=False)
            else:
                x = self.layer(layer, x, cos, sin, attn)
        return m.norm(x)
