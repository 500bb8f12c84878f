"""Stage 2: parallel SFT on synthetic NPR traces teaches a tiny model the format and (rising) accuracy;
rejection sampling through the engine keeps only correct, format-0 responses; `npr-async sft` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.llm import LLM
from engine.loader import load_model
from engine.sampler import SamplingParams
from npr_async.config import EngineConfig, LearnerConfig
from npr_async.format_score import format_score
from npr_async.models import init_model
from npr_async.tags import TagIds
from npr_async.task import make_dataset
from npr_async.tokenizer import format_prompt, load_tokenizer
from npr_async.data import read_jsonl, write_jsonl
from npr_async.training.sft import rejection_sample, sft_sample, train_sft
from npr_async.verifiers import get_verifier


def test_sft_sample_is_a_tree_with_completion_targets(tmp_path):
    tok = load_tokenizer()
    row = make_dataset(1, 2, 5, with_traces=True)[0]
    prompt = format_prompt(tok, row["prompt"])
    s = sft_sample(tok, TagIds.from_tokenizer(tok), prompt, row["trace"])
    n_prompt = len(tok.encode(prompt, add_special_tokens=False))
    assert not s.loss_mask[:n_prompt].any() and s.loss_mask[n_prompt:].all()
    assert s.token_ids[-1] == tok.eos_token_id
    n_parts = row["prompt"].count("=")
    assert len(s.parents) == 1 + n_parts + 1  # trunk, one step per part, the join
    assert s.parents[-1] == list(range(n_parts + 1))
    steps = [np.flatnonzero(s.segment_ids == k) for k in range(1, n_parts + 1)]
    assert len({int(s.positions[ix[0]]) for ix in steps}) == 1  # every step starts at the same position


def evaluate(llm, rows, verifier):
    trajs = llm.generate([format_prompt(llm.tokenizer, r["prompt"]) for r in rows],
                         SamplingParams(temperature=0, max_total_tokens=200, max_path_tokens=160, max_step_tokens=32))
    fmt = np.mean([format_score(t.text) == 0.0 for t in trajs])
    acc = np.mean([verifier.verify(r, t.text).correct for r, t in zip(rows, trajs)])
    return float(fmt), float(acc), trajs


@pytest.mark.slow
def test_sft_learns_format_and_accuracy_then_rejection_sampling(tmp_path):
    torch.set_num_threads(1)  # 2 shared cores: a second thread only spins
    model_dir = init_model("tiny", str(tmp_path / "base"), seed=0)
    model, tok = load_model(model_dir), load_tokenizer(str(model_dir))
    rows = [dict(r, completion=r.pop("trace")) for r in make_dataset(6144, 1, 1, with_traces=True)]
    heldout = make_dataset(64, 1, 99)
    verifier = get_verifier("math")
    llm = LLM(model, tok, EngineConfig())
    cfg = LearnerConfig(sft_lr=1e-2, sft_batch_size=16, sft_schedule="cosine", sft_warmup_ratio=0.05,
                        micro_batch_tokens=4096)
    curve = [evaluate(llm, heldout, verifier)[:2]]
    assert curve[0][1] == 0.0  # random init: nothing right

    def log(m):
        if m["step"] in (96, 384):
            curve.append(evaluate(llm, heldout, verifier)[:2])

    trainer = train_sft(model, tok, rows, cfg, model_dir=str(model_dir), log=log)
    assert trainer.step == 384 and len(curve) == 3
    (_, acc0), (_, acc1), (fmt2, acc2) = curve
    assert fmt2 >= 0.8, curve  # format score 0 on most samples
    assert acc2 >= 0.2 and acc2 > acc1 > acc0, curve  # rising accuracy

    # rejection sampling with the trained model: keep one correct, format-0 response per problem
    params = SamplingParams(temperature=1.0, max_total_tokens=200, max_path_tokens=160, max_step_tokens=32, seed=3)
    kept, stats = rejection_sample(llm, heldout[:24], 4, params, verifier)
    assert stats["samples"] == 96 and 0 < stats["kept"] == len(kept) <= 24
    by_id = {r["id"]: r for r in heldout}
    for r in kept:
        assert format_score(r["completion"]) == 0.0 and verifier.verify(by_id[r["id"]], r["completion"]).correct
    # → a dataset file → parallel SFT on it
    again = read_jsonl(write_jsonl(tmp_path / "sft.jsonl", kept))
    assert again == kept
    m = train_sft(model, tok, again, cfg).step
    assert m == -(-len(kept) // 16)


def test_sft_command_on_synthetic_traces(tmp_path):
    from npr_async.cli import main

    out = tmp_path / "out"
    assert main(["sft", "--set", f"logging.run_dir={tmp_path / 'run'}", "--set", "data.synthetic_train_size=24",
                 "--set", "learner.sft_batch_size=8", "--set", "learner.sft_lr=1e-3", "--set", "learner.sft_epochs=1",
                 "--out", str(out)]) == 0
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["loss"] == "sft"
    metrics = [json.loads(x) for x in (tmp_path / "run" / "sft_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics)
    load_model(out)  # an HF checkpoint the engine loads
    assert (out / "tokenizer.json").is_file()
