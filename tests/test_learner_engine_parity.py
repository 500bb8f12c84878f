"""Acceptance: the learner's logprobs of engine trajectories (forks, nested forks) equal the engine's (fp32 CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.llm import LLM
from engine.loader import load_model
from engine.sampler import SamplingParams
from npr_async.config import EngineConfig
from npr_async.models import init_model
from npr_async.tokenizer import format_prompt, load_tokenizer
from npr_async.training.packing import Sample
from npr_async.training.trainer import score_samples

TOP = "<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n<plan>3: c</plan>\n</guideline>"
NESTED = ("<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n</guideline>\n<step>\n1: x"
          "<guideline>\n<plan>1: p</plan>\n<plan>2: q</plan>\n</guideline>")


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    d = init_model("tiny", str(tmp_path_factory.mktemp("tiny")), seed=3)
    model = load_model(d)
    with torch.no_grad():  # sharper than the 0.02 init, so logprobs are far from uniform
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8.0)
    tok = load_tokenizer(str(d))
    return LLM(model, tok, EngineConfig(max_depth=3)), model, tok


def test_engine_logprobs_equal_learner_logprobs(engine_and_model):
    llm, model, tok = engine_and_model
    prompts = [format_prompt(tok, "Let A = 1+2. What is A?") + TOP,
               format_prompt(tok, "Let B = 3+4. What is B?") + NESTED,
               format_prompt(tok, "Let C = 5. What is C?")]
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                            branch_repetition_penalty=1.0, seed=11, max_total_tokens=120, max_path_tokens=90,
                            max_step_tokens=12)
    trajs = llm.generate(prompts, params, n=2)
    assert sum(t.num_forks for t in trajs) >= 4  # forks, nested ones among them
    assert any(len({*t.segs().tolist()}) > 4 + 1 for t in trajs[2:4])  # the nested prompt: > 5 segments
    scored = score_samples(model, [Sample.from_trajectory(t) for t in trajs], max_tokens=400)
    n = 0
    for t, lp in zip(trajs, scored):
        m = t.sampled_mask()
        assert m.sum() > 0
        # fp32, different batch shapes and summation orders: over seeds 6..15 the largest gap is 1.05e-5
        # (~20 ulp of a logprob near -5); 1e-5 held for the engine's former RNG stream by luck
        np.testing.assert_allclose(lp[m], t.lps()[m], rtol=0, atol=2e-5)
        n += int(m.sum())
    assert n > 200
