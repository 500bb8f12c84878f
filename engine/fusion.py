"""Inference-only projection fusion for `engine.model.CausalLM` (the learner keeps HF's modules).

The engine stacks q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`, so a decode step reads each
layer's input projections in one GEMM instead of several skinny ones; the products are numerically the same.
Parameter names then differ from HF's, so `named_weight_targets` maps every HF name to a row view of the
fused weight and `load_weights` / weight sync go through it. `CausalLM` exposes these as thin methods;
`Attention` / `MLP` only check `hasattr(self, "qkv_proj")` / `"gate_up_proj"` in their forward.
"""
from __future__ import annotations

import torch
from torch import nn

# fused module name -> the HF modules whose rows it stacks, in order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _fused_linear(*parts: nn.Linear) -> nn.Linear:
    """One Linear whose weight (and bias) rows are the parts' stacked in order, same device and dtype."""
    w = parts[0].weight
    out = type(parts[0])(w.shape[1], sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                         device=w.device, dtype=w.dtype)  # the parts' class (engine.model.Linear)
    if hasattr(parts[0], "gemm"):
        out.gemm = parts[0].gemm
    with torch.no_grad():
        out.weight.copy_(torch.cat([p.weight for p in parts]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([p.bias for p in parts]))
    return out


def _fuse(module: nn.Module, fused: str) -> None:
    """Replace the HF parts of `module` by one fused Linear named `fused`; no-op when already fused."""
    if hasattr(module, fused):
        return
    setattr(module, fused, _fused_linear(*(getattr(module, p) for p in FUSED[fused])))
    for p in FUSED[fused]:
        delattr(module, p)


def _part_rows(parent: nn.Module, fused: str) -> list[int]:
    if fused == "qkv_proj":
        return [parent.hq * parent.dh, parent.hkv * parent.dh, parent.hkv * parent.dh]
    half = parent.gate_up_proj.out_features // 2
    return [half, half]


def is_fused(model: nn.Module) -> bool:
    return any(hasattr(layer.self_attn, "qkv_proj") for layer in model.model.layers)


def fuse_projections(model: nn.Module) -> nn.Module:
    """q/k/v -> one `qkv_proj`, gate/up -> one `gate_up_proj` in every layer. Idempotent."""
    for layer in model.model.layers:
        _fuse(layer.self_attn, "qkv_proj")
        _fuse(layer.mlp, "gate_up_proj")
    return model


@torch.no_grad()
def named_weight_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF name -> tensor to copy that weight into, in place: the parameter itself, or for fused modules a
    contiguous row slice (a view) of the fused weight / bias. Built fresh on each call: views taken
    before a `.to(device)` would point at the old storage."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")  # e.g. model.layers.3.self_attn.qkv_proj, weight
        mod_path, _, mod = prefix.rpartition(".")
        if mod not in FUSED:
            out[name] = p
            continue
        parent = model.get_submodule(mod_path)
        sizes = _part_rows(parent, mod)
        for part, rows in zip(FUSED[mod], p.detach().split(sizes)):
            out[f"{mod_path}.{part}.{leaf}"] = rows
    return out


@torch.no_grad()
def load_weights(model: nn.Module, named_tensors) -> int:
    """Copy (name, tensor) pairs in place (weight updates, loaders); returns how many were copied.
    Names are HF's (also when fused) or the model's own parameter names."""
    params = named_weight_targets(model)
    if is_fused(model):
        params.update(model.named_parameters())
    n = 0
    for name, t in named_tensors:
        if name == "lm_head.weight" and model.args.tie_word_embeddings:
            continue
        if name not in params:
            raise KeyError(f"unknown parameter {name!r}")
        p = params[name]
        if p.shape != t.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(p.shape)}")
        p.copy_(t)
        n += 1
    return n
