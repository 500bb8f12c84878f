"""Checkpoints: an HF model directory (safetensors + config.json + tokenizer) plus `trainer_state.pt`.

The model directory loads in `AutoModelForCausalLM.from_pretrained` and in `engine.loader.load_model`
(weights keep HF names). `trainer_state.pt` holds what resuming needs for the same next step as never
stopping: optimizer and scheduler state, the step, and every RNG (torch CPU/CUDA, numpy, random).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TRAINER_STATE = "trainer_state.pt"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model", "generation_config.json")
ARCH = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def hf_config(args, dtype: torch.dtype) -> dict:
    """An HF config.json for `engine.model.ModelArgs` (used when no source config.json is at hand)."""
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling:
        rope = {**args.rope_scaling, "rope_theta": args.rope_theta}
    return {"architectures": [ARCH[args.model_type]], "model_type": args.model_type, "vocab_size": args.vocab_size,
            "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
            "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
            "num_key_value_heads": args.num_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
            "rms_norm_eps": args.rms_norm_eps, "rope_theta": args.rope_theta, "rope_parameters": rope,
            "max_position_embeddings": args.max_position_embeddings,
            "tie_word_embeddings": args.tie_word_embeddings, "attention_bias": args.qkv_bias,
            "mlp_bias": args.mlp_bias, "dtype": str(dtype).removeprefix("torch.")}


def _rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _full_state(trainer) -> tuple[dict, dict]:
    """(model weights, optimizer state), gathered to full CPU tensors when the model is sharded."""
    if trainer.cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(trainer.model, options=opts),
                get_optimizer_state_dict(trainer.model, trainer.optimizer, options=opts))
    return ({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, trainer.optimizer.state_dict())


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(trainer, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    if trainer.totals.num_sequences:
        raise RuntimeError("save_checkpoint in the middle of a step (gradients accumulated, finish_step first)")
    out = Path(out_dir)
    weights, optim = _full_state(trainer)  # every rank takes part in the gather
    if _rank0():
        _write(trainer, out, weights, optim, tokenizer_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # on return the checkpoint is complete for every rank (all may load it at once)
    return out


def _write(trainer, out: Path, weights: dict, optim: dict, tokenizer_dir) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    args = trainer.model.args
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # safetensors refuses shared storage; HF re-ties on load
    dtype = next(iter(weights.values())).dtype
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    src = Path(trainer.model_dir) if trainer.model_dir else None
    if src is not None and (src / "config.json").is_file():
        config = json.loads((src / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
    else:
        config = hf_config(args, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for d in (Path(tokenizer_dir) if tokenizer_dir else None, src):
        if d is not None and (d / "tokenizer_config.json").is_file():
            for name in TOKENIZER_FILES:
                if (d / name).is_file() and d.resolve() != out.resolve():
                    shutil.copyfile(d / name, out / name)
            break
    torch.save({"step": trainer.step, "optimizer": optim, "scheduler": trainer.scheduler.state_dict(),
                "rng": rng_state(), "loss": trainer.loss.name}, out / TRAINER_STATE)


def load_checkpoint(trainer, ckpt_dir: str | Path) -> None:
    """Restore weights, optimizer, scheduler, step and RNG into a Trainer built like the saved one."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt_dir)
    if not (ckpt / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{ckpt}: no {TRAINER_STATE} (not a learner checkpoint)")
    weights = load_file(str(ckpt / WEIGHTS))
    state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
    if trainer.cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        if trainer.model.args.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        set_model_state_dict(trainer.model, {k: v for k, v in weights.items() if k in trainer.model.state_dict()},
                             options=opts)
        set_optimizer_state_dict(trainer.model, trainer.optimizer, state["optimizer"], options=opts)
    else:
        trainer.model.load_weights(weights.items())
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.step = int(state["step"])
    set_rng_state(state["rng"])
