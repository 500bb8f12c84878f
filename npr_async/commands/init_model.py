"""`npr-async init-model`: write a random-init Qwen3 model and its tokenizer in HF format."""
from __future__ import annotations


def configure(parser) -> None:
    from npr_async.models import DTYPES, PRESETS

    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--seed", type=int, default=0, help="init seed: same seed, same weights")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="weight dtype (qwen3-4b-shape is 16 GB in float32: use bfloat16)")
    parser.add_argument("--tokenizer", default=None,
                        help="HF tokenizer directory (default: the bundled NPR tokenizer); tags are added if missing")


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from npr_async.models import count_parameters, init_model

    hf_logging.disable_progress_bar()  # one line of output, not a progress bar per shard
    out = init_model(args.preset, args.out, seed=args.seed, dtype=args.dtype, tokenizer_path=args.tokenizer)
    from transformers import AutoConfig

    n = count_parameters(AutoConfig.from_pretrained(str(out)))
    print(f"wrote {args.preset} ({n / 1e6:.1f}M parameters, {args.dtype}) to {out}")
    return 0
