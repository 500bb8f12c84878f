"""Checkpoints: HF-loadable (AutoModelForCausalLM, AutoTokenizer), and resuming is bitwise the same step."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.attention import CausalAttention
from engine.loader import load_model
from npr_async.config import LearnerConfig
from npr_async.tokenizer import BUNDLED_TOKENIZER
from npr_async.training.trainer import Trainer
from tests.learner_trees import random_trajectory, tiny_model


def batch(step):
    trajs = [random_trajectory(1000 * step + i, prompt_id="q") for i in range(4)]
    return trajs, [1.0, -1.0, 0.5, -1.0][: len(trajs)]


def run_step(tr, step):
    trajs, rewards = batch(step)
    tr.accumulate(trajs[:2], rewards[:2])
    tr.accumulate(trajs[2:], rewards[2:])
    return tr.finish_step()


def test_resume_is_bitwise_and_checkpoint_loads_in_hf(tmp_path):
    cfg = LearnerConfig(loss="papo", lr=1e-2, schedule="cosine", warmup_steps=1)
    a = Trainer(tiny_model(1), cfg, total_steps=5)
    run_step(a, 0)
    a.save(tmp_path / "ckpt", tokenizer_dir=BUNDLED_TOKENIZER)
    ma = run_step(a, 1)

    torch.manual_seed(999)
    b = Trainer(load_model(tmp_path / "ckpt"), cfg, total_steps=5)
    b.load(tmp_path / "ckpt")
    mb = run_step(b, 1)
    assert ma == mb  # same loss, grad norm, lr, step
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), n
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)

    # the checkpoint is an HF model directory
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert tok.encode("<step>", add_special_tokens=False) != []
    ours = load_model(tmp_path / "ckpt").eval()
    ids = torch.arange(1, 20)
    with torch.no_grad():
        want = hf(input_ids=ids[None]).logits[0].float()
        got = ours.compute_logits(ours(ids, torch.arange(19), CausalAttention()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_resume_restores_rng(tmp_path):
    a = Trainer(tiny_model(2), LearnerConfig(loss="sft"))
    torch.manual_seed(5)
    a.save(tmp_path / "c")
    x = torch.rand(4)
    torch.manual_seed(77)
    b = Trainer(load_model(tmp_path / "c"), LearnerConfig(loss="sft"))
    b.load(tmp_path / "c")
    assert torch.equal(torch.rand(4), x)
