"""evaluation.py + `npr-async eval`: metrics recomputed independently from the engine's trajectories and the
verifier's verdicts; correct/incorrect answers via hand-written responses through the same scoring."""
from __future__ import annotations

import json
import re
from collections import Counter

import msgspec
import pytest

from npr_async.evaluation import default_sampling, evaluate, render_table, \
    score_response, summarize
from npr_async.messages import Trajectory
from npr_async.task import make_dataset

SEED = 7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from npr_async.models import init_model

    return str(init_model("tiny", str(tmp_path_factory.mktemp("tiny"))))


@pytest.fixture(scope="module")
def llm(model_dir):
    from engine.llm import LLM

    return LLM(model_dir)


def small_sampling(**kw):
    return msgspec.structs.replace(default_sampling(), max_total_tokens=32, max_path_tokens=32, **kw)


def forced_fork_row(llm, row):
    """A row whose prompt ends right after a guideline of two plans: the engine must fork at once."""
    from npr_async.tokenizer import format_prompt

    text = format_prompt(llm.tokenizer, row["prompt"]) + "<guideline>\n<plan>1: A</plan>\n<plan>2: B</plan>\n</guideline>"
    return {**row, "id": row["id"] + "-fork", "prompt_ids": llm.tokenizer.encode(text, add_special_tokens=False)}


def traj(text: str, prompt_id: str, sample_idx: int = 0, *, num_tokens=10, num_forks=0, num_branches=0,
         finish_reason="stop") -> Trajectory:
    """A real Trajectory carrying a hand-written response (the arrays hold one placeholder token)."""
    return Trajectory.build(token_ids=[1], positions=[0], segment_ids=[0], parents=[[]], logprobs=[None],
                            sampled=[False], prompt_id=prompt_id, sample_idx=sample_idx, prompt_len=1,
                            finish_reason=finish_reason, text=text, num_tokens=num_tokens,
                            critical_path=num_tokens, num_forks=num_forks, num_branches=num_branches)


def test_engine_metrics_match_an_independent_recount(llm):
    """evaluate() == generating the same prompts with the same seeds ourselves and counting by hand."""
    from engine.sampler import branch_seed
    from npr_async.tokenizer import format_prompt
    from npr_async.verifiers import get_verifier

    plain = make_dataset(2, 2, 0)
    rows = plain + [forced_fork_row(llm, plain[0])]
    k, sampling = 3, small_sampling(seed=SEED)
    res = evaluate(llm, rows, k=k, sampling=sampling)

    prompts = [r["prompt_ids"] if "prompt_ids" in r else format_prompt(llm.tokenizer, r["prompt"])
               for r in rows for _ in range(k)]
    params = [msgspec.structs.replace(sampling, seed=branch_seed(SEED, (i, j))) for i in range(len(rows))
              for j in range(k)]
    trajs = llm.generate(prompts, params, prompt_ids=[r["id"] for r in rows for _ in range(k)])
    verdicts = [get_verifier("math").verify(rows[n // k], t.text) for n, t in enumerate(trajs)]

    assert [(s.prompt_id, s.sample_idx) for s in res.samples] == [(r["id"], j) for r in rows for j in range(k)]
    assert [s.text for s in res.samples] == [t.text for t in trajs]  # seeded: the same samples again
    assert res.num_problems == 3 and res.num_samples == 9 and res.k == k
    assert res.avg_at_k == pytest.approx(sum(v.correct for v in verdicts) / 9)
    assert res.best_at_k == pytest.approx(
        sum(any(verdicts[i * k + j].correct for j in range(k)) for i in range(3)) / 3)
    assert res.parallel_trigger_rate == pytest.approx(sum(t.num_forks > 0 for t in trajs) / 9)
    forks = sum(t.num_forks for t in trajs)
    assert forks >= k and res.branches_per_fork == pytest.approx(sum(t.num_branches for t in trajs) / forks)
    assert all(t.num_forks >= 1 and t.num_branches >= 2 for t in trajs[-k:])  # the forced fork
    assert res.total_tokens == sum(t.num_tokens for t in trajs) > 0
    assert res.mean_tokens == pytest.approx(res.total_tokens / 9)
    assert res.tokens_per_s == pytest.approx(res.total_tokens / res.wall_seconds) and res.wall_seconds > 0
    assert res.finish_reasons == dict(Counter(t.finish_reason for t in trajs))
    assert all(t.num_tokens <= 32 for t in trajs)
    assert res.sampling["top_p"] == 0.7 and res.sampling["temperature"] == 1.0  # NPR's eval sampling


def test_hand_written_answers_scored_and_summarised():
    rows = make_dataset(2, 2, 3, with_traces=True)
    a, b = rows
    wrong = a["trace"].replace("\\boxed{" + a["answer"] + "}", "\\boxed{" + str(int(a["answer"]) + 1) + "}")
    cases = [  # (row, response, forks, branches, tokens, finish)
        (a, a["trace"], 1, 3, 40, "stop"),  # correct, NPR format
        (a, wrong, 1, 3, 40, "stop"),  # wrong answer, good format
        (b, f"The parts add up. \\boxed{{{b['answer']}}}", 0, 0, 12, "stop"),  # correct, no parallel structure
        (b, "I am not sure", 0, 0, 8, "length"),  # no answer
    ]
    samples = [score_response(r, traj(text, r["id"], j, num_tokens=n, num_forks=f, num_branches=br,
                                      finish_reason=fin))
               for j, (r, text, f, br, n, fin) in enumerate(cases)]
    assert [s.correct for s in samples] == [True, False, True, False]
    assert [s.reward for s in samples] == [1.0, -1.0, 1.0, -1.0]
    assert [s.format_ok for s in samples] == [True, True, False, False]
    assert samples[0].format_score == 0.0 and samples[0].extracted == a["answer"]

    res = summarize(samples, k=2, wall_seconds=4.0)
    assert res.avg_at_k == 0.5 and res.best_at_k == 1.0
    assert res.parallel_trigger_rate == 0.5 and res.branches_per_fork == 3.0
    assert res.total_tokens == 100 and res.tokens_per_s == 25.0 and res.mean_tokens == 25.0
    assert res.format_ok_rate == 0.5 and res.mean_reward == 0.0
    assert res.finish_reasons == {"length": 1, "stop": 3}
    # one problem all wrong: best@k counts problems, not samples
    res2 = summarize(samples[:2] + [samples[3]], k=2, wall_seconds=1.0)
    assert res2.best_at_k == 0.5 and res2.avg_at_k == pytest.approx(1 / 3)
    assert summarize([], k=2, wall_seconds=0.0).tokens_per_s == 0.0


def test_table_plain_and_rich(capsys):
    import io

    s = score_response({"id": "p", "prompt": "?", "answer": "3"}, traj("\\boxed{3}", "p", num_tokens=5))
    res = summarize([s], k=1, wall_seconds=0.5)
    buf = io.StringIO()
    render_table(res, file=buf)  # not a terminal: plain
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in buf.getvalue().splitlines())
    assert lines["avg@k"] == "100.00%" and lines["tokens/s"] == "10.0" and lines["finish reasons"] == "stop: 1"
    buf = io.StringIO()
    render_table(res, file=buf, rich=True)
    assert "npr-async eval" in buf.getvalue() and "best@k" in buf.getvalue()


def test_bad_arguments(llm):
    rows = make_dataset(1, 2, 0)
    with pytest.raises(ValueError, match="k must be"):
        evaluate(llm, rows, k=0)
    with pytest.raises(ValueError, match="not unique"):
        evaluate(llm, rows + rows, k=1)
    with pytest.raises(ValueError, match="no rows"):
        evaluate(llm, [], k=1)


def run_cli(argv):
    from npr_async.cli import main

    return main(["eval", *argv])


def test_cli_writes_json_and_samples(model_dir, tmp_path, capsys):
    from npr_async.commands.make_data import write_rows

    pytest.importorskip("npr_async.data")
    data = write_rows(make_dataset(2, 2, 1), str(tmp_path / "d.jsonl"))
    out, samples = tmp_path / "r.json", tmp_path / "s.jsonl"
    assert run_cli(["--model", model_dir, "--data", str(data), "--k", "2", "--max-total-tokens", "32",
                    "--seed", "3", "--top-p", "0.9", "--out", str(out), "--samples-out", str(samples)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(rows) == 4 == written["num_samples"] and written["num_problems"] == 2
    assert written["avg_at_k"] == pytest.approx(sum(r["correct"] for r in rows) / 4)
    assert written["total_tokens"] == sum(r["num_tokens"] for r in rows)
    assert written["sampling"]["top_p"] == 0.9 and written["sampling"]["max_total_tokens"] == 32
    assert all(r["num_tokens"] <= 32 for r in rows)


def test_cli_clear_errors(model_dir, tmp_path, capsys):
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"id": "a", "prompt": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(SystemExit, match="--model .*no such directory"):
        run_cli(["--model", str(tmp_path / "nope"), "--data", str(good)])
    with pytest.raises(SystemExit, match="no config.json"):
        run_cli(["--model", str(tmp_path), "--data", str(good)])
    with pytest.raises(SystemExit, match="--data .*no such file"):
        run_cli(["--model", model_dir, "--data", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit, match="--k must be >= 1"):
        run_cli(["--model", model_dir, "--data", str(good), "--k", "0"])
    pytest.importorskip("npr_async.data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x", "answer": "1"}\n{not json\n')
    with pytest.raises(SystemExit, match="bad.jsonl"):
        run_cli(["--model", model_dir, "--data", str(bad)])
