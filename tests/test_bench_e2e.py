"""bench/e2e.py's pieces that need no cluster (forced guideline, per-run summary); bench/rollout.py on the CPU."""
import importlib.util
import json
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


def test_step_record_sums_each_generators_reports_and_engine_counters():
    from npr_async.messages import StepReport

    def report(actor, seconds, tokens, forwards, graph_steps, engine_s):
        return StepReport(step=3, version=3, role="rollout", actor=actor, seconds=seconds, num_tokens=tokens,
                          metrics={"tokens_per_s": tokens / seconds, "engine_calls": 1.0, "engine_s": engine_s,
                                   "forwards": forwards, "graph_steps": graph_steps, "steps_ahead": 0.0,
                                   "preemptions": 0.0})
    m = {"step_s": 4.0, "rollout_s": 3.0, "weight_sync_s": 0.5, "learner_compute_s": 1.0, "samples": 8}
    # a re-dispatch gives rollout-0 two reports in the step; rollout-1 made no engine forward (empty shard)
    reports = [report("rollout-0", 2.0, 300, 100, 80, 1.5), report("rollout-0", 1.0, 100, 50, 50, 0.5),
               report("rollout-1", 0.5, 0, 0, 0, 0.0)]
    rec = e2e.step_record(3, m, reports, verify_rate=16.0)
    assert rec["gen_s"] == {"rollout-0": 3.0, "rollout-1": 0.5} and rec["gen_tokens"] == {"rollout-0": 400,
                                                                                          "rollout-1": 0}
    eng = rec["engine"]["rollout-0"]
    assert (eng["forwards"], eng["graph_steps"], eng["engine_calls"]) == (150, 130, 2)
    assert eng["ms_per_forward"] == pytest.approx(1e3 * 2.0 / 150) and "tokens_per_s" not in eng
    assert rec["engine"]["rollout-1"]["ms_per_forward"] is None
    assert rec["learner_tail_s"] == pytest.approx(0.5) and rec["verify_cpu_s"] == pytest.approx(0.5)
    assert rec["idle_frac"] == {"learner": 0.75, "rollout-0": 0.25, "rollout-1": 0.875}


def test_configurations_sweep_generators_streaming_and_windows():
    runs = e2e.configurations([1, 2], [True], [16, 96])
    assert [r[3] for r in runs] == ["gen=1,stream=on,chunk=16", "gen=1,stream=on,chunk=96",
                                    "gen=2,stream=on,chunk=16", "gen=2,stream=on,chunk=96"]
    assert e2e.configurations([3], [True, False], []) == [(3, True, 0, "gen=3,stream=on"),
                                                         (3, False, 0, "gen=3,stream=off")]  # the config's window


def test_bench_rollout_times_the_generators_call_on_the_cpu(tmp_path, monkeypatch):
    """`npr-async bench rollout`: the generator's engine call in-process, every call reported with its counters
    and the collector's pauses; --cprofile adds one call under cProfile; --fork-groups-from 0 turns the fork-group
    graphs off for the run; --norm-kernel 0,1 runs an engine per value (the CPU has no kernel: same calls)."""
    import engine.cuda_graphs as cuda_graphs
    from npr_async.cli import main

    monkeypatch.setattr(cuda_graphs, "FORK_GROUPS_FROM", cuda_graphs.FORK_GROUPS_FROM)  # restored afterwards
    out = tmp_path / "rollout.json"
    rc = main(["bench", "rollout", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--shape", "",
               "--samples", "6", "--calls", "2", "--run-dir", str(tmp_path / "run"), "--out", str(out),
               "--cprofile", "1", "--fork-groups-from", "0", "--norm-kernel", "0,1"])
    assert rc == 0
    res = json.loads(out.read_text())
    calls = res["calls"]
    assert [c["call"] for c in calls] == [0, 1, 2] * 2 and res["fork_groups_from"] == cuda_graphs.FORK_GROUPS_FROM > 512
    assert [c["norm_kernel"] for c in calls] == [False] * 3 + [True] * 3
    for c in calls:
        assert c["forwards"] > 0 and c["tokens_per_sample"] > 0 and c["ms_per_forward"] > 0
        assert c["tokens_per_s"] == pytest.approx(6 * c["tokens_per_sample"] / c["wall_s"])
        assert all(n >= 1 and ms >= 0 for n, ms in c["gc"].values())
    assert "cprofile" not in calls[1] and "ncalls" in calls[2]["cprofile"] and "ncalls" in calls[5]["cprofile"]
