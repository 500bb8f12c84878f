"""Stage 2: rejection sampling through the engine → a dataset file → parallel SFT.

Parallel SFT trains on the *tree* of each response: the text is tokenised and `parse_structure` gives
positions and segment visibility (the function the engine follows), so steps do not see their siblings in
training either. The loss is completion-only cross-entropy (the prompt is never a target).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from npr_async.structure import parse_structure
from npr_async.tags import TagIds
from npr_async.training.packing import Sample


def sft_sample(tokenizer, tags: TagIds, prompt: str, completion: str, max_depth: int = 5) -> Sample:
    """Prompt text (chat-formatted) + completion text (+ EOS) → a tree sample with completion targets."""
    p = tokenizer.encode(prompt, add_special_tokens=False)
    c = tokenizer.encode(completion, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]  # the engine stops on EOS: the model must learn to emit it
    ids = np.asarray(p + c, dtype=np.int32)
    s = parse_structure(ids, tags, max_depth=max_depth)
    loss_mask = np.arange(len(ids)) >= max(len(p), 1)
    return Sample(ids, s.positions, s.segment_ids, s.parents, loss_mask, None, {"reward": 0.0})


def sft_samples(tokenizer, rows: list[dict], max_depth: int = 5) -> list[Sample]:
    from npr_async.tokenizer import format_prompt

    tags = TagIds.from_tokenizer(tokenizer)
    out = []
    for i, r in enumerate(rows):
        if "completion" not in r or "prompt" not in r:
            raise ValueError(f"SFT row {i} ({r.get('id', '?')}) needs `prompt` and `completion`")
        out.append(sft_sample(tokenizer, tags, format_prompt(tokenizer, r["prompt"]), r["completion"], max_depth))
    return out


def train_sft(model, tokenizer, rows: list[dict], cfg, *, seed: int = 0, model_dir: str | None = None,
              max_depth: int = 5, log: Callable[[dict], None] | None = None,
              epochs: int | None = None):
    """`cfg` is the LearnerConfig (sft_lr, sft_batch_size, sft_epochs, sft_schedule, sft_warmup_ratio)."""
    from npr_async.training.trainer import Trainer

    samples = sft_samples(tokenizer, rows, max_depth)
    if not samples:
        raise ValueError("no SFT examples (rejection sampling kept nothing?)")
    epochs = epochs or cfg.sft_epochs
    per_epoch = math.ceil(len(samples) / cfg.sft_batch_size)
    total = epochs * per_epoch
    trainer = Trainer(model, cfg, loss="sft", lr=cfg.sft_lr, schedule=cfg.sft_schedule,
                      warmup_steps=round(cfg.sft_warmup_ratio * total), total_steps=total, model_dir=model_dir)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(samples))
        for b in range(per_epoch):
            batch = [samples[i] for i in order[b * cfg.sft_batch_size:(b + 1) * cfg.sft_batch_size]]
            metrics = trainer.train_samples(batch)
            if log is not None:
                log({"epoch": epoch, **metrics})
    return trainer


def rejection_sample(llm, rows: list[dict], k: int, params, verifier) -> tuple[list[dict], dict]:
    """k samples per problem through the engine; keep the first that is correct with format score 0.

    Returns (kept rows `{id, prompt, answer, completion}`, stats)."""
    from npr_async.format_score import format_score
    from npr_async.tokenizer import format_prompt

    prompts = [format_prompt(llm.tokenizer, r["prompt"]) for r in rows]
    trajs = llm.generate(prompts, params, prompt_ids=[str(r["id"]) for r in rows], n=k)
    kept, stats = [], {"problems": len(rows), "samples": len(trajs), "stopped": 0, "format_ok": 0, "correct": 0}
    for i, row in enumerate(rows):
        chosen = None
        for t in trajs[i * k:(i + 1) * k]:
            if t.finish_reason != "stop":
                continue
            stats["stopped"] += 1
            fmt_ok = format_score(t.text) == 0.0
            ok = verifier.verify(row, t.text).correct
            stats["format_ok"] += fmt_ok
            stats["correct"] += ok
            if fmt_ok and ok and chosen is None:
                chosen = t.text
        if chosen is not None:
            kept.append({"id": row["id"], "prompt": row["prompt"], "answer": row["answer"], "completion": chosen})
    stats["kept"] = len(kept)
    return kept, stats
