"""`npr-async generate`: parallel-decode prompts with the NPR-Engine into JSONL trajectories.

Input rows: `{"prompt": "text"}` (sent as is, no chat template) or `{"prompt_ids": [ints]}`, optionally with
`"id"`. Output rows: `Trajectory.to_json_row()` (schema in docs/engine.md), `--n` rows per prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

from npr_async.config import ConfigError, EngineConfig

_E = EngineConfig()


def configure(p) -> None:
    p.add_argument("--model", required=True, help="HF model directory (config.json + safetensors + tokenizer)")
    p.add_argument("--prompts", required=True, help="input JSONL: {\"prompt\": text} or {\"prompt_ids\": [...]}")
    p.add_argument("--out", required=True, help="output JSONL of trajectories")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: the model's, else bundled)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="base seed; sample i of a prompt uses seed + i")
    p.add_argument("--max-total-tokens", type=int, default=_E.max_total_tokens)
    p.add_argument("--max-path-tokens", type=int, default=_E.max_path_tokens)
    p.add_argument("--max-step-tokens", type=int, default=_E.max_step_tokens)
    p.add_argument("--max-plans", type=int, default=_E.max_plans)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--sequential", action="store_true", help="never fork (Stage 1 decoding)")
    p.add_argument("--kv-slots", type=int, default=_E.kv_slots)
    p.add_argument("--device", default="cpu")


def read_prompts(path: str) -> tuple[list, list[str]]:
    """(prompts, ids) from a JSONL file; a bad row raises ConfigError naming file:line."""
    prompts, ids = [], []
    from npr_async.data import DatasetError, iter_jsonl

    if not Path(path).is_file():
        raise ConfigError(f"prompts file not found: {path}")
    try:
        rows = list(iter_jsonl(path))
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    for row, where in rows:
        if not isinstance(row, dict) or ("prompt" in row) == ("prompt_ids" in row):
            raise ConfigError(f"{where}: expected an object with exactly one of \"prompt\" or \"prompt_ids\"")
        if "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise ConfigError(f"{where}: \"prompt\" must be a non-empty string")
            prompts.append(row["prompt"])
        else:
            v = row["prompt_ids"]
            if not isinstance(v, list) or not v or not all(isinstance(t, int) and not isinstance(t, bool)
                                                           and t >= 0 for t in v):
                raise ConfigError(f"{where}: \"prompt_ids\" must be a non-empty list of non-negative ints")
            prompts.append(v)
        ids.append(str(row.get("id", len(ids))))
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    return prompts, ids


def run(args) -> int:
    from engine import LLM, SamplingParams

    prompts, ids = read_prompts(args.prompts)
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    try:
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
            max_total_tokens=args.max_total_tokens, max_path_tokens=args.max_path_tokens,
            max_step_tokens=args.max_step_tokens, max_plans=args.max_plans, parallel=not args.sequential)
        cfg = EngineConfig(kv_slots=args.kv_slots, max_plans=min(16, max(1, args.max_plans)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tok = None
    if args.tokenizer:
        from npr_async.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    if not Path(args.model).is_dir():
        raise ConfigError(f"--model: {args.model} is not a directory")
    llm = LLM(args.model, tok, cfg, device=args.device)
    vocab = llm.model.args.vocab_size
    for i, p in enumerate(prompts):
        if isinstance(p, list) and max(p) >= vocab:
            raise ConfigError(f"{args.prompts}: prompt {i} (id {ids[i]}) has token ids >= vocab size {vocab}")
    trajs = llm.generate(prompts, params, prompt_ids=ids, n=args.n)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for t in trajs:
            f.write(json.dumps(t.to_json_row()) + "\n")
    reasons = {}
    for t in trajs:
        reasons[t.finish_reason] = reasons.get(t.finish_reason, 0) + 1
    print(f"wrote {len(trajs)} trajectories to {args.out}: {sum(t.num_tokens for t in trajs)} tokens, "
          f"{sum(t.num_forks for t in trajs)} forks, finish {reasons}")
    return 0
