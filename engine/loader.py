"""Build a `CausalLM` from an HF directory (config.json + safetensors, sharded or not) or a GGUF file."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.model import CausalLM, ModelArgs


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> CausalLM:
    """`path`: an HF model directory, a `.gguf` file, or a directory holding exactly one `.gguf` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected an HF model directory or a .gguf file")
        return load_gguf(path, dtype, device)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], dtype, device)
        raise FileNotFoundError(f"{path}: no config.json (and not exactly one .gguf file)")
    config = json.loads((path / "config.json").read_text())
    model = _build(ModelArgs.from_hf_config(config), dtype, device)
    _load_safetensors(model, path, device)
    return model


def _build(args: ModelArgs, dtype, device) -> CausalLM:
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        model = CausalLM(args)
    return model.to_empty(device=device).to(dtype)


def _load_safetensors(model: CausalLM, path: Path, device) -> None:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    expected = set(model.state_dict())
    seen: set[str] = set()
    for name in files:
        with safe_open(str(path / name), framework="pt", device=str(device)) as f:
            keys = list(f.keys())
            model.load_weights((k, f.get_tensor(k)) for k in keys)
            seen.update(keys)
    missing = expected - seen
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")


def read_gguf(file: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, HF-named float32 tensors) of a GGUF file, dequantised by transformers' GGUF reader,
    which also renames tensors and undoes llama.cpp's q/k row permutation. Needs no `accelerate`."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    file = Path(file)
    config = transformers.AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    with torch.device("meta"):  # a weightless HF skeleton: only its parameter names are used
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=skeleton)["tensors"]
    return config.to_dict(), tensors


def load_gguf(file: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> CausalLM:
    return from_tensors(*read_gguf(file), dtype=dtype, device=device)


def from_tensors(config: dict, tensors: dict[str, torch.Tensor], dtype=torch.float32, device="cpu") -> CausalLM:
    """A model from an HF config dict and a complete HF-named state dict."""
    model = _build(ModelArgs.from_hf_config(config), dtype, device)
    model.load_state_dict(tensors, strict=True)
    return model
