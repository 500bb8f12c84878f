"""The planner's arithmetic on hand-computed cases, monotonicity in cluster size, balanced recommendations."""
import json

import pytest

from npr_async.planner import (VERIFIER_TOLERANCE, Layout, Rates, Workload, broadcast_seconds, compare,
                               fit_gen_curve, predict, rates_from_run, recommend, run_in_flight,
                               verifier_workers_for)

# 1 s broadcasts, no hop latency, a flat generator rate: every number below is worked out by hand
RATES = Rates(gen_tokens_per_s=1000, learner_tokens_per_s=2000, verdicts_per_s=100, tokens_per_sample=100,
              model_bytes=1e9, sync_bw_intra=1e9, sync_bw_inter=0.5e9, sync_latency_s=0.0, learner_scaling=1.0)
WORK = Workload(prompts_per_step=4, samples_per_prompt=2, chunk_samples=4)


def test_one_generator_streaming_by_hand():
    p = predict(RATES, WORK, Layout(1, 1, 1))
    # 8 samples in 2 chunks of 4: rollout 8·100/1000 = 0.8 s, first chunk done at 0.4 s
    assert p.rollout_s == pytest.approx(0.8)
    # last chunk's 4 verdicts at 100/s trail the rollout by 0.04 s; the verifier is not the bottleneck (0.48)
    assert p.verify_end_s == pytest.approx(0.84)
    # learner: 800 tokens at 2000/s = 0.4 s; first groups at 0.44 → 0.84, last wave 400 tokens → 0.84 + 0.2
    assert p.learner_work_s == pytest.approx(0.4)
    assert p.learner_end_s == pytest.approx(1.04)
    assert p.learner_tail_s == pytest.approx(0.24)
    assert p.sync_s == pytest.approx(1.0)
    assert p.step_s == pytest.approx(2.04)
    assert p.learner_idle == pytest.approx(1 - 0.4 / 2.04)
    assert p.rollout_idle == pytest.approx(1 - 0.8 / 2.04)


def test_streaming_off_by_hand():
    p = predict(RATES, Workload(4, 2, 4, streaming=False), Layout(1, 1, 1))
    assert p.learner_end_s == pytest.approx(0.84 + 0.4)
    assert p.step_s == pytest.approx(2.24)


def test_two_generators_by_hand():
    p = predict(RATES, WORK, Layout(2, 1, 1))
    # 2 prompts × 2 samples each: one chunk of 4, 0.4 s; both generators' 8 verdicts at 100/s: 0.48
    assert p.rollout_s == pytest.approx(0.4)
    assert p.verify_end_s == pytest.approx(0.48)
    # learner: first groups at 0.48, all 800 tokens arrive in that one wave → 0.48 + 0.4
    assert p.learner_end_s == pytest.approx(0.88)
    assert p.step_s == pytest.approx(1.88)


def test_slow_verifier_is_the_bottleneck():
    slow = Rates(**{**RATES.__dict__, "verdicts_per_s": 5.0})
    p = predict(slow, Workload(4, 2, 4, streaming=False), Layout(1, 1, 1))
    # 8 verdicts at 5/s after the first chunk (0.4 s) beat 0.8 + 4/5
    assert p.verify_end_s == pytest.approx(max(0.8 + 0.8, 0.4 + 1.6))
    assert p.bottleneck == "verify"


def test_prompts_bound_the_useful_generators():
    four = predict(RATES, WORK, Layout(4, 1, 1))
    eight = predict(RATES, WORK, Layout(8, 1, 1))
    assert four.rollout_s == eight.rollout_s == pytest.approx(0.2)  # one prompt each; 4 more do nothing


def test_broadcast_models():
    assert broadcast_seconds(1e9, 3, 1e9, 0.01, "ring") == pytest.approx(1.03)
    assert broadcast_seconds(1e9, 3, 1e9, 0.01, "tree") == pytest.approx(2 * 1.01)  # ⌈log2 4⌉ levels
    assert broadcast_seconds(1e9, 0, 1e9, 0.01) == 0.0
    # across nodes the slower inter-node bandwidth applies
    assert predict(RATES, WORK, Layout(8, 1, 1), gpus_per_node=8).sync_s == pytest.approx(2.0)


def test_generator_rate_curve():
    r = Rates(**{**RATES.__dict__, "gen_batch": 32, "gen_half_batch": 32})
    assert r.gen_rate(32) == pytest.approx(1000)  # the measured point
    assert r.gen_rate(8) == pytest.approx(2000 * 8 / 40)  # peak 2000, half at 32
    assert r.learner_rate(4) == pytest.approx(8000)
    assert Rates(**{**RATES.__dict__, "learner_scaling": 0.9}).learner_rate(4) == pytest.approx(2000 * 4 * 0.81)


@pytest.mark.parametrize("gpus_per_node", [4, 8])
def test_more_gpus_never_predict_slower(gpus_per_node):
    rates = Rates(gen_tokens_per_s=8000, learner_tokens_per_s=20000, verdicts_per_s=200, tokens_per_sample=900,
                  model_bytes=2.4e9, gen_batch=64, gen_half_batch=16, learner_scaling=0.9)
    work = Workload(64, 8, 32)
    last = float("inf")
    for gpus in list(range(2, 33)) + [64, 128, 256, 512]:
        p = recommend(rates, work, gpus, gpus_per_node=gpus_per_node, cpus_per_node=16)
        assert p.layout.gpus <= gpus
        # each answer keeps the fewest verifiers within the tolerance of its own step with every free CPU
        assert p.step_s <= last * (1 + VERIFIER_TOLERANCE) * (1 + 1e-12), gpus
        lean = recommend(rates, work, gpus, gpus_per_node=gpus_per_node, cpus_per_node=16, slack=0.05)
        assert lean.layout.gpus <= p.layout.gpus
        assert lean.step_s <= p.step_s * 1.05 * (1 + VERIFIER_TOLERANCE) * (1 + 1e-9)
        last = p.step_s


def test_recommendation_keeps_the_fewest_verifiers_that_keep_up():
    # slow verifiers (20 verdicts/s each) for 512 samples a step: how many it takes is a real trade-off
    rates = Rates(gen_tokens_per_s=8000, learner_tokens_per_s=20000, verdicts_per_s=20, tokens_per_sample=900,
                  model_bytes=2.4e9, learner_scaling=0.9)
    work = Workload(64, 8, 32)
    p = recommend(rates, work, 16, gpus_per_node=8, cpus_per_node=64)
    cap = verifier_workers_for(2, 64, p.layout.gpus)  # what the CPUs left by the GPU actors hold
    full = predict(rates, work, Layout(p.layout.generators, p.layout.learner_gpus, cap))
    n_v = p.layout.verifier_workers
    assert 1 < n_v < cap
    assert p.step_s <= full.step_s * (1 + VERIFIER_TOLERANCE)
    # one fewer would be slower than the tolerance allows (brute force over the neighbour)
    fewer = predict(rates, work, Layout(p.layout.generators, p.layout.learner_gpus, n_v - 1))
    assert fewer.step_s > full.step_s * (1 + VERIFIER_TOLERANCE)


def test_recommendation_balances_rollout_and_learner():
    # fast verifiers, cheap sync, one-sample chunks, many prompts: the step is about max(rollout, learner work)
    rates = Rates(gen_tokens_per_s=5000, learner_tokens_per_s=15000, verdicts_per_s=1e6, tokens_per_sample=1000,
                  model_bytes=1e6, learner_scaling=1.0)
    work = Workload(4096, 1, 1)
    p = recommend(rates, work, 64)
    assert p.layout.gpus == 64
    assert abs(p.rollout_s - p.learner_work_s) / max(p.rollout_s, p.learner_work_s) < 0.05
    # the learner is 3× faster per GPU: a quarter of the GPUs learn (48 + 16 makes both 17.07 s)
    assert p.layout.learner_gpus == 16
    # and moving one GPU either way is no better
    for d in (-1, 1):
        moved = Layout(p.layout.generators + d, p.layout.learner_gpus - d, p.layout.verifier_workers)
        assert predict(rates, work, moved).step_s >= p.step_s


def test_rates_and_compare_from_a_bench_json():
    run = {"label": "gen=2,stream=on", "generators": 2, "streaming": True,
           "config": {"prompts_per_step": 4, "samples_per_prompt": 2, "chunk_samples": 4, "learner_gpus": 1,
                      "verifier_workers": 1},
           "mean": {"gen_tokens_per_s": 1000, "learner_tokens_per_s": 2000, "tokens_per_sample": 100,
                    "weight_sync_s": 1.0, "step_s": 2.0, "rollout_s": 0.4, "learner_tail_s": 0.5,
                    "learner_idle": 0.8, "rollout_idle": 0.8}}
    doc = json.loads(json.dumps({"meta": {"weight_bytes": 1e9}, "verifier": {"verdicts_per_s_per_worker": 100},
                                 "runs": [run]}))
    rates = rates_from_run(doc, run, sync_latency_s=0.0)
    assert rates.sync_bw_intra == pytest.approx(1e9)
    assert rates.gen_batch == 4
    (row,) = compare([(doc, run)], rates)
    assert row["predicted"]["step_s"] == pytest.approx(1.88)
    assert row["error"] == pytest.approx(1.88 / 2.0 - 1)


def test_generator_curve_fitted_from_runs_at_several_windows(tmp_path, capsys):
    """fit_gen_curve recovers peak · b / (b + h) from its points; needs two windows and a rising rate; the plan
    command fits it from bench runs at several `chunk_samples` and predicts each run's rollout with it."""
    peak, h = 30000.0, 25.0
    curve = lambda b: peak * b / (b + h)  # noqa: E731
    assert fit_gen_curve([(b, curve(b)) for b in (16, 32, 48, 96, 96)]) == pytest.approx((peak, h))
    assert fit_gen_curve([(16, 9000.0), (16, 9100.0)]) is None  # one window: no curve
    assert fit_gen_curve([(16, 9000.0), (96, 8000.0)]) is None  # slower with more in flight: no such curve

    def run(chunk):
        return {"label": f"gen=1,stream=on,chunk={chunk}", "generators": 1, "streaming": True,
                "config": {"prompts_per_step": 12, "samples_per_prompt": 8, "chunk_samples": chunk,
                           "learner_gpus": 1, "verifier_workers": 4},
                "mean": {"gen_tokens_per_s": curve(min(chunk, 96)), "learner_tokens_per_s": 1e9,
                         "tokens_per_sample": 500, "weight_sync_s": 0.01, "step_s": 96 * 500 / curve(min(chunk, 96)),
                         "rollout_s": 96 * 500 / curve(min(chunk, 96)), "learner_tail_s": 0.0,
                         "learner_idle": 0.5, "rollout_idle": 0.0}}
    runs = [run(c) for c in (16, 48, 200)]
    assert [run_in_flight(r) for r in runs] == [16, 48, 96]  # a window wider than the shard: the shard
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"meta": {"weight_bytes": 1e9}, "verifier": {"verdicts_per_s_per_worker": 1e6},
                                "runs": runs}))
    from npr_async.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--measured", str(path), "--gpus", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["gen_curve_fit"]["half_batch"] == pytest.approx(h) and res["rates"]["gen_half_batch"] == pytest.approx(h)
    for row in res["validation"]:  # calibrated on the first run, the curve predicts the others' rollouts
        assert row["predicted"]["rollout_s"] == pytest.approx(row["measured"]["rollout_s"], rel=1e-6)
    assert "half of it at 25.0 samples" in capsys.readouterr().out


@pytest.mark.parametrize("layout", [Layout(3, 1, 4), Layout(26, 36, 386)])
def test_a_layout_deploys_through_config_overrides(layout):
    from npr_async.config import load_config
    from npr_async.planner import config_overrides

    c = load_config(None, config_overrides(layout))
    assert (c.rollout.num_workers, c.learner.num_workers, c.verifier.num_workers) == (
        layout.generators, layout.learner_gpus, layout.verifier_workers)
    assert c.rollout.num_gpus_per_worker == 1 and c.learner.num_gpus == 1
    assert c.learner.fsdp == (layout.learner_gpus > 1)  # several learner ranks shard with FSDP
