"""One decoder for Qwen3 and the Llama / Qwen2 family, shared by the engine and the learner.

Tokens are flat (no batch dimension): packed sequences or all live branches concatenated. Attention is
delegated to a backend called as `attn(layer_idx, q, k, v)` after q/k-norm and RoPE, so the same module
serves masked training (engine/attention.py) and paged decoding over KV slots (a backend with `rotates_qk`, the
CUDA-graph decode step's, gets q / k as projected plus `rope=` and `qk_norms=`, and applies both itself).
Parameter names equal HF's, so HF state dicts load with `load_state_dict(strict=True)` and our state dicts
save as HF checkpoints.
The engine may fuse q/k/v and gate/up into single GEMMs (`fuse_projections`, engine/fusion.py); HF names
then address views of the fused weights (`named_weight_targets`), so weight updates keep working by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine import fusion
from engine.qk_rope import norm_rope
from engine.rope import Rotary, apply_rope

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # rope_type + its parameters; None = default RoPE
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (only silu / SwiGLU)")
        if cfg.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported (use_sliding_window=true)")
        # transformers 5 keeps theta and scaling in `rope_parameters`; older configs use rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        if scaling is not None and rope_type == "llama3":
            scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        heads = cfg["num_attention_heads"]
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else bias,  # Qwen2 always has q/k/v bias and no o bias
            o_bias=False if mt == "qwen2" else bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=mt == "qwen3",
        )


class Linear(nn.Linear):
    """nn.Linear whose product an inference engine may route to its own kernel (`CausalLM.set_gemm`)."""

    gemm = None  # (x, weight, bias) -> x @ weight.T + bias; None: F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) if self.gemm is None else self.gemm(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    kernel = None  # (x, weight, eps) -> rms_norm's result, an engine's one-launch norm (`CausalLM.set_norm`)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps) if self.kernel is None else self.kernel(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, this norm of it): a residual add and the norm after it, one launch with an engine's kernel
        (`kernel.add`); (x, norm(x)) when delta is None."""
        if delta is None:
            return x, self(x)
        fused = getattr(self.kernel, "add", None)
        if fused is not None:
            return fused(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise the last dim in float32, scale in the input dtype (as HF); weight broadcasts from the right."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx, self.hq, self.hkv, self.dh = layer_idx, args.num_heads, args.num_kv_heads, args.head_dim
        d = args.hidden_size
        self.q_proj = Linear(d, self.hq * self.dh, bias=args.qkv_bias)
        self.k_proj = Linear(d, self.hkv * self.dh, bias=args.qkv_bias)
        self.v_proj = Linear(d, self.hkv * self.dh, bias=args.qkv_bias)
        self.o_proj = Linear(self.hq * self.dh, d, bias=args.o_bias)
        if args.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(self.dh, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.dh, args.rms_norm_eps)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], attn) -> torch.Tensor:
        o = attn(self.layer_idx, *self.qkv(x, rope))
        return self.o_proj(o.reshape(x.shape[0], self.hq * self.dh))

    def projections(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, Dh], k and v [T, Hkv, Dh] as projected, before q/k-norm and RoPE (with fused q/k/v: views of
        its one output). A decode kernel that norms and rotates them itself takes these and `qk_norms()`."""
        t = x.shape[0]
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([self.hq * self.dh, self.hkv * self.dh, self.hkv * self.dh], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q.view(t, self.hq, self.dh), k.view(t, self.hkv, self.dh), v.view(t, self.hkv, self.dh)

    def qk_norms(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(q_norm weight, k_norm weight, eps); (None, None, 0.0) for a model without q/k-norm."""
        if hasattr(self, "q_norm"):
            return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps
        return None, None, 0.0

    def qkv(self, x, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, Dh], k and v [T, Hkv, Dh]: projections, q/k-norm and RoPE (what attention backends get)."""
        t = x.shape[0]
        if not hasattr(self, "qkv_proj"):
            q, k, v = self.projections(x)
            if hasattr(self, "q_norm"):
                q, k = self.q_norm(q), self.k_norm(k)
            return apply_rope(q, *rope), apply_rope(k, *rope), v
        # fused (engine/fusion.py): column slices of one output (views), and the q and k heads normed and
        # rotated together by one kernel (engine/qk_rope.py)
        qk, v = self.qkv_proj(x).split([(self.hq + self.hkv) * self.dh, self.hkv * self.dh], -1)
        qk, v = qk.view(t, self.hq + self.hkv, self.dh), v.view(t, self.hkv, self.dh)
        wq, wk, eps = self.qk_norms()
        qk = norm_rope(qk, wq, wk, self.hq, eps, *rope)
        q, k = qk.split([self.hq, self.hkv], 1)
        return q, k, v


class MLP(nn.Module):
    swiglu = None  # (x, gate_up weight, bias) -> silu(gate) * up for the fused gate/up (`CausalLM.set_gemm`)

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, i, b = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = Linear(d, i, bias=b), Linear(d, i, bias=b), Linear(i, d, bias=b)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            if self.swiglu is not None:
                return self.down_proj(self.swiglu(x, self.gate_up_proj.weight, self.gate_up_proj.bias))
            gate, up = self.gate_up_proj(x).chunk(2, -1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, rope, attn, delta=None, defer: bool = False):
        """x after the layer. With `defer` the layer's last residual add is left to the next norm: it returns (x,
        the MLP's output) instead of their sum, and adds `delta` (the layer before's such output, or None) in its
        input norm (`RMSNorm.add`: one launch with the engine's norm kernel, where an uncompiled step would run
        each add alone). Same values either way."""
        a = self.self_attn
        x, h = self.input_layernorm.add(x, delta)
        if getattr(attn, "rotates_qk", False):  # a decode kernel that applies q/k-norm and RoPE itself
            o = attn(a.layer_idx, *a.projections(h), rope=rope, qk_norms=a.qk_norms())
        else:
            o = attn(a.layer_idx, *a.qkv(h, rope))
        x, h = self.post_attention_layernorm.add(x, a.o_proj(o.reshape(x.shape[0], -1)))
        out = self.mlp(h)
        return (x, out) if defer else x + out

    # The layer in two halves around the attention call: the learner compiles each half (norms, RoPE,
    # SwiGLU and residuals fuse) and calls the attention backend, which is not traced, in between.
    def attention_inputs(self, x, rope):
        return self.self_attn.qkv(self.input_layernorm(x), rope)

    def attention_output_mlp(self, x, o):
        x = x + self.self_attn.o_proj(o.reshape(x.shape[0], -1))
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):  # HF's `model.` prefix
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = Rotary(args)


class CausalLM(nn.Module):
    """`forward(input_ids [T], positions [T], attn) -> hidden [T, D]`; `compute_logits(hidden) -> [T, V] f32`."""

    head_gemm = None  # the LM head's product (`set_gemm`); None: F.linear

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        # learner: recompute layers in backward; True: all, or a collection of layer indices
        self.gradient_checkpointing: bool | frozenset[int] = False
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        else:  # tied: no lm_head parameter; accept (and drop) the duplicate key HF state dicts carry
            self._register_load_state_dict_pre_hook(_drop_tied_head, with_module=True)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"flat tokens expected: input_ids {tuple(input_ids.shape)}, positions {tuple(positions.shape)}")
        m = self.model
        x, delta = m.embed_tokens(input_ids), None
        rope = m.rotary_emb.cos_sin(positions, x.dtype)
        ckpt = self.gradient_checkpointing if torch.is_grad_enabled() else False
        for i, layer in enumerate(m.layers):  # each add left to the next norm (DecoderLayer.forward's defer)
            if ckpt is True or (ckpt and i in ckpt):
                x = checkpoint(layer, x if delta is None else x + delta, rope, attn, use_reentrant=False)
                delta = None
            else:
                x, delta = layer(x, rope, attn, delta, defer=True)
        return m.norm.add(x, delta)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head_logits(hidden).float()

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's product in the model's dtype (compute_logits' values before the float32 copy)."""
        return (self.head_gemm or F.linear)(hidden, self.head_weight, None)

    def set_gemm(self, gemm=None) -> "CausalLM":
        """Route every projection and the LM head through `gemm(x, weight, bias)` (the engine's decode GEMM,
        engine/decode_linear.py), and fused MLPs through `gemm.swiglu` when it has one; None restores F.linear.
        Inference only: the kernels need not have a backward."""
        for mod in self.modules():
            if isinstance(mod, Linear):
                mod.gemm = gemm
            elif isinstance(mod, MLP):  # a gemm may bring SwiGLU fused into the gate/up product
                mod.swiglu = getattr(gemm, "swiglu", None)
        self.head_gemm = gemm
        return self

    def set_norm(self, kernel=None) -> "CausalLM":
        """Route every RMSNorm through `kernel(x, weight, eps)` (engine/triton_norm.py's `decode_rms_norm`: one
        launch instead of eight in a decode step that is not compiled); None restores `rms_norm`."""
        for mod in self.modules():
            if isinstance(mod, RMSNorm):
                mod.kernel = kernel
        return self

    # inference: fused projections behind HF names (engine/fusion.py) --------------------------------
    @property
    def fused(self) -> bool:
        return fusion.is_fused(self)

    def fuse_projections(self) -> "CausalLM":
        """Engine only: q/k/v -> `qkv_proj`, gate/up -> `gate_up_proj`; HF names stay loadable. Idempotent."""
        return fusion.fuse_projections(self)

    def named_weight_targets(self) -> dict[str, torch.Tensor]:
        """HF name -> tensor (parameter or row view of a fused one) to copy that weight into, in place."""
        return fusion.named_weight_targets(self)

    def load_weights(self, named_tensors) -> int:
        """Copy (name, tensor) pairs in place; HF or own names; returns how many were copied."""
        return fusion.load_weights(self, named_tensors)


def _drop_tied_head(module, state_dict, prefix, *args, **kwargs):
    state_dict.pop(prefix + "lm_head.weight", None)
