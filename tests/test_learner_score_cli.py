"""`npr-async score` on rows written by `npr-async generate`: learner logprobs match the engine's."""
from __future__ import annotations

import json

import numpy as np

from npr_async.cli import main
from npr_async.models import init_model


def test_score_adds_learner_logprobs(tmp_path):
    model = init_model("tiny", str(tmp_path / "m"), seed=1)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<guideline>\n"
                                             "<plan>1: a</plan>\n<plan>2: b</plan>\n</guideline>"}) + "\n")
    assert main(["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "t.jsonl"),
                 "--n", "2", "--seed", "3", "--max-total-tokens", "60", "--max-step-tokens", "8"]) == 0
    assert main(["score", "--model", str(model), "--trajectories", str(tmp_path / "t.jsonl"),
                 "--out", str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["segments"][1:] and all(x is None for x in r["learner_logprobs"][:r["prompt_len"]])
        # inside steps `generate` samples with NPR's branch repetition penalty 1.02, which the learner's plain
        # softmax does not have: exact agreement outside steps, a small visible mismatch inside them (a repeated
        # token's logit l moves by <= 2% of |l|, the normaliser by as much; |l| < 1 here: < 0.04 in all, 0.015
        # seen with the engine's current sampling stream)
        steps = {k for k, seg in enumerate(r["segments"]) if len(seg["parents"]) == 1}
        sampled = [i for i, s in enumerate(r["sampled"]) if s]
        trunk = [i for i in sampled if r["segment_ids"][i] not in steps]
        assert trunk and len(trunk) < len(sampled)
        np.testing.assert_allclose([r["learner_logprobs"][i] for i in trunk], [r["logprobs"][i] for i in trunk],
                                   rtol=0, atol=1e-5)
        np.testing.assert_allclose([r["learner_logprobs"][i] for i in sampled], [r["logprobs"][i] for i in sampled],
                                   rtol=0, atol=3e-2)
        forced = [i for i in range(r["prompt_len"], len(r["token_ids"])) if not r["sampled"][i]]
        assert forced and all(r["learner_logprobs"][i] is not None for i in forced)  # headers scored too
        assert 0 < r["logprob_max_abs_diff"] < 3e-2
