"""`npr-async sft --config CFG`: Stage 2. Rejection sampling through the engine → a dataset file → parallel SFT.

Data (`--data`, else `learner.sft_data`): a JSONL file of `{id, prompt, answer, completion}` rows; with none
and the synthetic task (`data.train` empty): its solution traces (the stand-in for self-distilled data when
no trained model is at hand); otherwise rejection-sample `learner.sft_samples_per_problem` responses per problem of
`data.train` (or the synthetic task) with the model itself, keeping one correct response with format score 0.
The trained model is written as an HF checkpoint (+ trainer state) to `<run_dir>/sft` or `--out`.
"""
from __future__ import annotations

import json
from pathlib import Path


def configure(p) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: the embedded CPU config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--model", default="", help="HF model directory (default: model.path, else a new preset)")
    p.add_argument("--data", default=None, help="SFT JSONL (default: learner.sft_data, else traces / rejection sampling)")
    p.add_argument("--out", default="", help="output checkpoint directory (default: <run_dir>/sft)")
    p.add_argument("--device", default="cpu")


def problem_rows(cfg) -> list[dict]:
    from npr_async.task import make_dataset

    if cfg.data.train:
        from npr_async.data import load_rows

        return load_rows(cfg.data.train)
    return make_dataset(cfg.data.synthetic_train_size, cfg.data.synthetic_difficulty, cfg.data.seed,
                        with_traces=True)


def sft_rows(cfg, model_dir: str, source: str, run_dir: Path, device: str) -> list[dict]:
    """A JSONL file if given; else the synthetic task's traces; else rejection sampling through the engine."""
    from npr_async.data import read_jsonl, write_jsonl
    from npr_async.training.sft import rejection_sample

    if source:
        return read_jsonl(source)
    rows = problem_rows(cfg)
    if all("trace" in r for r in rows):
        return [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"], "completion": r["trace"]} for r in rows]
    import torch

    from engine.llm import LLM
    from engine.sampler import SamplingParams
    from npr_async.verifiers import get_verifier

    llm = LLM(model_dir, config=cfg.engine, device=device, dtype=getattr(torch, cfg.model.dtype))
    params = SamplingParams.from_config(cfg.engine, cfg.rollout.sampling, seed=cfg.controller.seed,
                                        parallel=not cfg.learner.sft_sequential_sampling)
    kept, stats = rejection_sample(llm, rows, cfg.learner.sft_samples_per_problem, params,
                                   get_verifier(cfg.verifier.default, cfg.verifier))
    path = write_jsonl(run_dir / "sft_data.jsonl", kept)
    print(f"rejection sampling: {json.dumps(stats)} -> {path}")
    return kept


def run(args) -> int:
    import torch

    from engine.loader import load_model
    from npr_async.config import load_config
    from npr_async.tokenizer import load_tokenizer
    from npr_async.training.sft import train_sft

    cfg = load_config(args.config, args.set)
    run_dir = Path(cfg.logging.run_dir)
    model_dir = args.model or cfg.model.path
    if not model_dir:
        from npr_async.models import init_model

        model_dir = str(init_model(cfg.model.preset, str(run_dir / "base"), seed=cfg.model.seed))
    source = cfg.learner.sft_data if args.data is None else args.data
    rows = sft_rows(cfg, model_dir, source, run_dir, args.device)
    if not rows:
        print("npr-async sft: no SFT examples (rejection sampling kept none); nothing to train")
        return 1
    tokenizer = load_tokenizer(cfg.tokenizer.path or model_dir)
    model = load_model(model_dir, torch.float32, args.device)  # fp32 master weights
    log_path = run_dir / "sft_metrics.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        def record(m: dict) -> None:
            log.write(json.dumps(m) + "\n")
            if m["step"] % 10 == 0:
                print(f"sft step {m['step']}: loss {m['loss']:.4f} lr {m['lr']:.3g}", flush=True)

        trainer = train_sft(model, tokenizer, rows, cfg.learner, seed=cfg.controller.seed, model_dir=model_dir,
                            max_depth=cfg.engine.max_depth, log=record)
    out = Path(args.out or run_dir / "sft")
    trainer.save(out, tokenizer_dir=cfg.tokenizer.path or model_dir)
    print(f"npr-async sft: {trainer.step} steps on {len(rows)} examples -> {out}")
    return 0
