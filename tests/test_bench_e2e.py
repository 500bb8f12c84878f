"""bench/e2e.py's pieces that need no cluster: the forced guideline and the per-run summary."""
import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
e2e = importlib.util.module_from_spec(spec)
spec.loader.exec_module(e2e)


def test_forced_guideline_opens_the_reply_and_forks(tmp_path):
    from npr_async.format_score import check_guideline
    from npr_async.tokenizer import BUNDLED_TOKENIZER, format_prompt, load_tokenizer

    shutil.copytree(BUNDLED_TOKENIZER, tmp_path / "m")
    prefix = e2e.force_guideline(str(tmp_path / "m"), 3)
    e2e.force_guideline(str(tmp_path / "m"), 3)  # idempotent: one prefix, not two
    text = format_prompt(load_tokenizer(str(tmp_path / "m")), "What is 2+3?")
    assert text.endswith("<|im_start|>assistant\n" + prefix) and text.count("<guideline>") == 1
    assert check_guideline(prefix, max_plans=4) == (3, None)  # the engine's pre-branch check accepts it


def test_summary_rates():
    steps = [{"step_s": 2.0, "rollout_s": 1.5, "weight_sync_s": 0.1, "learner_wait_s": 1.0, "learner_compute_s": 1.0,
              "learner_s": 1.9, "learner_tail_s": 0.4, "verify_cpu_s": 0.1, "tokens_per_s": 1000.0,
              "rollout_tokens": 1500, "samples": 10, "gen_s": {"rollout-0": 1.5, "rollout-1": 1.0},
              "gen_tokens": {"rollout-0": 900, "rollout-1": 600}, "idle_frac_learner": 0.5,
              "idle_frac_rollout_min": 0.25, "idle_frac_rollout_max": 0.5, "parallel_trigger_rate": 1.0, "branches_per_fork": 3.0}]
    m = e2e.summarise(steps)
    assert m["gen_tokens_per_s"] == pytest.approx(1500 / 2.5)
    assert m["learner_tokens_per_s"] == pytest.approx(1500.0)
    assert m["tokens_per_sample"] == pytest.approx(150.0)
    assert (m["rollout_idle"], m["rollout_idle_max"]) == (0.25, 0.5)  # busiest generator (the planner's), most idle
