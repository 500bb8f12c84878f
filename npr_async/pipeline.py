"""`npr-async train`: the stages of a run, read top to bottom.

    model + tokenizer ─► data ─► Stage 2: parallel SFT ─► held-out eval ─► Stage 3: PAPO over the actors
                                                                         ─► held-out eval ─► summary

The run directory holds `config.yaml`, `metrics.jsonl`, TensorBoard events, `curves.png`, checkpoints,
`state.json` (what is done, for `--resume`) and `summary.json`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec

from npr_async.config import Config, dump_yaml
from npr_async.metrics import MetricsLogger, Progress, plot_curves


def driver_device(cfg: Config) -> str:
    """Where the driver's own engine runs (rejection sampling, held-out eval): a GPU when the run uses GPUs."""
    import torch

    wants_gpu = cfg.learner.num_gpus > 0 or cfg.rollout.num_gpus_per_worker > 0
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def _driver_llm(cfg: Config, model_dir: str):
    import torch

    from engine.llm import LLM

    device = driver_device(cfg)
    dtype = getattr(torch, cfg.model.dtype) if device == "cuda" else torch.float32
    return LLM(model_dir, config=cfg.engine, device=device, dtype=dtype)


def prepare_model(cfg: Config, run_dir: Path) -> str:
    if cfg.model.path:
        if not (Path(cfg.model.path) / "config.json").is_file():
            raise FileNotFoundError(f"model.path {cfg.model.path}: no config.json there")
        return cfg.model.path
    from npr_async.models import init_model

    out = run_dir / "init_model"
    if not (out / "config.json").is_file():
        init_model(cfg.model.preset, str(out), seed=cfg.model.seed, dtype=cfg.model.dtype,
                   tokenizer_path=cfg.tokenizer.path or None)
    return str(out)


def prepare_data(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows); the synthetic task when no files are given (disjoint seeds)."""
    from npr_async.data import load_rows
    from npr_async.task import make_dataset

    d = cfg.data
    train = load_rows(d.train) if d.train else make_dataset(d.synthetic_train_size, d.synthetic_difficulty, d.seed,
                                                           with_traces=True, trace_noise=d.synthetic_trace_noise)
    heldout = load_rows(d.heldout) if d.heldout else make_dataset(d.synthetic_heldout_size,
                                                                  d.synthetic_difficulty, d.seed + 1)
    overlap = {str(r["id"]) for r in train} & {str(r["id"]) for r in heldout}
    if overlap:
        raise ValueError(f"train and held-out data share {len(overlap)} ids, e.g. {sorted(overlap)[:3]}")
    return train, heldout


def sft_rows(cfg: Config, model_dir: str, train: list[dict]) -> list[dict]:
    """Stage 2 data: a file, the synthetic task's correct traces, or rejection sampling through the engine."""
    from npr_async.data import read_jsonl

    if cfg.learner.sft_data:
        return read_jsonl(cfg.learner.sft_data)
    if all("trace" in r for r in train):
        return [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"], "completion": r["trace"]}
                for r in train]
    from engine.sampler import SamplingParams
    from npr_async.training.sft import rejection_sample
    from npr_async.verifiers import get_verifier

    llm = _driver_llm(cfg, model_dir)
    params = SamplingParams.from_config(cfg.engine, cfg.rollout.sampling, seed=cfg.controller.seed,
                                        parallel=not cfg.learner.sft_sequential_sampling)
    kept, _ = rejection_sample(llm, train, cfg.learner.sft_samples_per_problem, params,
                               get_verifier(cfg.verifier.default))
    return kept


def run_sft(cfg: Config, model_dir: str, train: list[dict], out_dir: Path, logger: MetricsLogger) -> str:
    import torch

    from engine.loader import load_model
    from npr_async.tokenizer import load_tokenizer
    from npr_async.training.sft import train_sft

    rows = sft_rows(cfg, model_dir, train)
    torch.manual_seed(cfg.controller.seed)
    model = load_model(model_dir, torch.float32, driver_device(cfg))
    tokenizer = load_tokenizer(model_dir)
    total = cfg.learner.sft_epochs * -(-len(rows) // cfg.learner.sft_batch_size)
    with Progress(total, "Stage 2 SFT", cfg.logging.progress) as bar:
        def log(m: dict) -> None:
            logger.log(m["step"], {f"sft/{k}": v for k, v in m.items()
                                   if isinstance(v, (int, float)) and k != "step"})
            bar.update(1, loss=m["loss"])
        trainer = train_sft(model, tokenizer, rows, cfg.learner, seed=cfg.controller.seed, model_dir=model_dir,
                            max_depth=cfg.engine.max_depth, log=log)
    trainer.save(str(out_dir), model_dir)
    return str(out_dir)


def heldout_eval(cfg: Config, model_dir: str, rows: list[dict]) -> dict:
    from engine.sampler import SamplingParams
    from npr_async.evaluation import evaluate

    llm = _driver_llm(cfg, model_dir)
    params = SamplingParams.from_config(cfg.engine, cfg.rollout.eval_sampling, seed=cfg.controller.seed + 7)
    res = evaluate(llm, rows, k=cfg.controller.eval_k, sampling=params, verifier=cfg.verifier.default,
                   verifier_config=cfg.verifier)
    return res.to_dict()


class RunState(msgspec.Struct):
    """What a run has finished, written after each phase and checkpoint (`--resume` reads it)."""
    phase: str = "start"  # start | sft_done | rl
    policy_dir: str = ""  # the model the next phase starts from
    rl_step: int = 0  # RL steps done
    checkpoint: str = ""
    heldout_sft: dict = {}


def _save_state(run_dir: Path, state: RunState) -> None:
    tmp = run_dir / "state.json.tmp"
    tmp.write_bytes(msgspec.json.encode(state))
    tmp.replace(run_dir / "state.json")


def train(cfg: Config, run_dir: str | None = None, resume: bool = False, on_dispatch=None) -> dict:
    t_start = time.perf_counter()
    run = Path(run_dir or cfg.logging.run_dir)
    state_file = run / "state.json"
    if resume and not state_file.is_file():
        raise FileNotFoundError(f"--resume: {state_file} does not exist (nothing to resume)")
    if not resume and state_file.is_file():
        raise FileExistsError(f"{run} already holds a run: pass --resume, or choose another --run-dir")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    state = msgspec.json.decode(state_file.read_bytes(), type=RunState) if resume else RunState()
    logger = MetricsLogger(run, cfg.logging.tensorboard)
    train_rows, heldout = prepare_data(cfg)
    summary: dict = {"stage": cfg.stage}
    try:
        if state.phase == "start":
            policy = prepare_model(cfg, run)
            if cfg.stage in ("stage2", "stage2+3"):
                policy = run_sft(cfg, policy, train_rows, run / "sft", logger)
            state = RunState(phase="sft_done", policy_dir=policy,
                             heldout_sft=heldout_eval(cfg, policy, heldout) if heldout else {})
            _save_state(run, state)
        summary["heldout_accuracy_sft"] = state.heldout_sft.get("avg_at_k")
        final_dir = state.checkpoint or state.policy_dir
        if cfg.stage in ("stage3", "stage2+3", "stage1"):
            final_dir = _rl(cfg, run, state, train_rows, logger, on_dispatch)
        final = heldout_eval(cfg, final_dir, heldout) if heldout else {}
        summary.update(heldout_accuracy_final=final.get("avg_at_k"), heldout_sft=state.heldout_sft,
                       heldout_final=final, final_model=final_dir)
    finally:
        logger.close()
    summary.update(steps=cfg.controller.steps, wall_seconds=time.perf_counter() - t_start, run_dir=str(run))
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.logging.plot:
        plot_curves(run, run / "curves.png")
    return summary


def _rl(cfg: Config, run: Path, state: RunState, train_rows: list[dict], logger, on_dispatch) -> str:
    from npr_async.controller import Cluster, checkpoint_dir, init_ray, run_step, step_prompts

    init_ray(cfg)
    resume_from = state.checkpoint if state.phase == "rl" else None
    cluster = Cluster(cfg, state.policy_dir, train_rows, resume=resume_from)
    last = state.checkpoint
    try:
        c = cfg.controller
        with Progress(c.steps, "Stage 3 PAPO", cfg.logging.progress) as bar:
            bar.update(state.rl_step)
            for step in range(state.rl_step, c.steps):
                rows = step_prompts(train_rows, step, cfg.rollout.prompts_per_step, c.seed)
                m = run_step(cluster, step, rows, on_dispatch)
                logger.log(step + 1, {k: v for k, v in m.items()
                                      if isinstance(v, (int, float)) and k not in ("step", "time")})
                bar.update(1, reward=m["reward"], acc=m["accuracy"], par=m["parallel_trigger_rate"],
                           tok_s=m["tokens_per_s"], step_s=m["step_s"])
                if (c.checkpoint_every and (step + 1) % c.checkpoint_every == 0) or step + 1 == c.steps:
                    last = str(checkpoint_dir(run, step + 1))
                    cluster.save_learner(last)
                    state = RunState(phase="rl", policy_dir=state.policy_dir, rl_step=step + 1,
                                     checkpoint=last, heldout_sft=state.heldout_sft)
                    _save_state(run, state)
    finally:
        cluster.shutdown()
    return last or state.policy_dir
