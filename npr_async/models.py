"""Random-init Qwen3 models in HF format: the `init-model` presets.

`tiny` trains on 2 CPU cores, `small` (~25M parameters) is for quick GPU runs, `qwen3-4b-shape` has
Qwen3-4B's published dimensions for GPU benchmarks. tiny and small take their vocabulary from the
tokenizer (padded to a multiple of 64); the 4B shape keeps Qwen3's 151936 rows.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from npr_async.tokenizer import BUNDLED_TOKENIZER, EMBED_MULTIPLE, add_npr_tokens, load_tokenizer

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=512, max_position_embeddings=4096, rope_theta=10000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=64, intermediate_size=1536, max_position_embeddings=8192, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True),
    # Qwen3-0.6B (config.json of Qwen/Qwen3-0.6B): the multi-GPU end-to-end benchmark's shape
    "qwen3-0.6b-shape": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                             max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                             tie_word_embeddings=True, vocab_size=151936),
    # Qwen3-4B (config.json of Qwen/Qwen3-4B)
    "qwen3-4b-shape": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, intermediate_size=9728,
                           max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                           tie_word_embeddings=True, vocab_size=151936),
}
DTYPES = ("float32", "bfloat16", "float16")
# files of an HF tokenizer directory, copied verbatim when the tokenizer needs no change
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")


def model_config(preset: str, tokenizer=None):
    """The `Qwen3Config` of `preset`; token ids (and for tiny/small the vocabulary) from `tokenizer`."""
    from transformers import Qwen3Config

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = dict(PRESETS[preset])
    rope_theta = p.pop("rope_theta")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    n = len(tokenizer)
    vocab = p.pop("vocab_size", math.ceil(n / EMBED_MULTIPLE) * EMBED_MULTIPLE)
    if vocab < n:
        raise ValueError(f"preset {preset!r} has {vocab} embedding rows, fewer than the tokenizer's {n} tokens")
    pad = tokenizer.pad_token_id
    return Qwen3Config(
        vocab_size=vocab, hidden_act="silu", attention_bias=False, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, use_cache=True,
        bos_token_id=pad, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, **p)


def count_parameters(config) -> int:
    """Parameters of a Qwen3 model with `config`, computed from the dimensions (no allocation)."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attn = c.hidden_size * (2 * q + 2 * kv) + 2 * c.head_dim  # q, k, v, o + q/k norms
    layer = attn + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    emb = c.vocab_size * c.hidden_size
    return c.num_hidden_layers * layer + c.hidden_size + emb * (1 if c.tie_word_embeddings else 2)


def init_model(preset: str, out_dir: str, seed: int = 0, dtype: str = "float32",
               tokenizer_path: str | None = None) -> Path:
    """Write a random-init `Qwen3ForCausalLM` and its tokenizer into `out_dir` (HF format).

    The tokenizer gets the NPR tags if it lacks them (`add_npr_tokens`). Same arguments, same bytes.
    """
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    tok = load_tokenizer(tokenizer_path)
    had_tags = _has_tags(tok)
    config = model_config(preset, tok)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    tok, model = add_npr_tokens(tok, model)
    model.eval()
    ids = {tok.eos_token_id, tok.pad_token_id} - {None}
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, pad_token_id=tok.pad_token_id,
        eos_token_id=sorted(ids) if len(ids) > 1 else next(iter(ids), None))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    src = Path(tokenizer_path) if tokenizer_path else BUNDLED_TOKENIZER
    if had_tags:  # unchanged: copy the files as they are (keeps their format and bytes)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    else:
        tok.save_pretrained(str(out))
    return out


def _has_tags(tokenizer) -> bool:
    from npr_async.tags import NPR_TAGS

    return all(len(tokenizer.encode(t, add_special_tokens=False)) == 1 for t in NPR_TAGS)
