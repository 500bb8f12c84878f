"""The synthetic task: exact answers (checked with Python's own arithmetic), determinism, NPR traces."""
import json
import random
import re

import pytest

from npr_async import format as npr_format
from npr_async import format_score as rubric
from npr_async.cli import main
from npr_async.tags import JOIN_HEADER, step_header
from npr_async.task import LEVELS, evaluate, make_dataset, make_problem, make_problems, solution_trace

QUESTION_RE = re.compile(r"^Let (.+)\. What is ([A-E+\-*]+)\?$")


def _reference_answer(question: str) -> int:
    """Recompute from the question text alone, with Python's arithmetic (independent of task.evaluate)."""
    m = QUESTION_RE.match(question)
    assert m, question
    env = {}
    for d in m.group(1).split(", "):
        name, expr = d.split(" = ")
        assert re.fullmatch(r"[0-9+\-*]+", expr)
        env[name] = eval(expr, {"__builtins__": {}})  # digits and + - * only (checked above)
    return eval(m.group(2), {"__builtins__": {}}, env)


@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_answers_are_exact(difficulty):
    lv = LEVELS[difficulty]
    for p in make_problems(300, difficulty, seed=11):
        assert p.answer == _reference_answer(p.question)
        assert lv.parts[0] <= len(p.parts) <= lv.parts[1] <= 5
        for part in p.parts:
            assert part.value == eval(part.expr, {"__builtins__": {}})
            nums = [int(x) for x in re.split(r"[+\-*]", part.expr)]
            assert all(lv.operand[0] <= x <= lv.operand[1] for x in nums)


def test_difficulty_2_is_small():
    probs = make_problems(500, 2, seed=0)
    assert {len(p.parts) for p in probs} == {2, 3}
    assert all(re.fullmatch(r"[1-9]\+[1-9]", part.expr) for p in probs for part in p.parts)


def test_evaluate_matches_python():
    rng = random.Random(5)
    for _ in range(2000):
        n = rng.randint(1, 6)
        expr = str(rng.randint(0, 999)) + "".join(rng.choice("+-*") + str(rng.randint(0, 999)) for _ in range(n - 1))
        assert evaluate(expr) == eval(expr)
    for bad in ("", "1+", "+1", "1++2", "1/2", "x"):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_deterministic_for_a_seed():
    a, b = make_dataset(50, 3, seed=9), make_dataset(50, 3, seed=9)
    assert a == b
    assert make_dataset(50, 3, seed=10) != a
    assert len({r["id"] for r in a}) == 50
    assert make_problem(random.Random(1), 4) == make_problem(random.Random(1), 4)


def test_bad_inputs():
    for d in (0, 9, "2", None):
        with pytest.raises(ValueError, match="difficulty"):
            make_problem(random.Random(0), d)
    with pytest.raises(ValueError):
        make_dataset(-1, 2, 0)


@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_traces_are_npr_and_contain_every_part(difficulty):
    for p in make_problems(100, difficulty, seed=3):
        t = solution_trace(p)
        doc = npr_format.parse(t)
        assert len(doc.blocks) == 1 and not doc.stray_tags
        block = doc.blocks[0]
        assert len(block.plans) == len(block.steps) == len(p.parts)
        for k, (part, plan, step) in enumerate(zip(p.parts, block.plans, block.steps), 1):
            assert plan.id == step.id == str(k)
            assert f"{part.name}={part.expr}" in plan.text
            assert step.text.strip().endswith(f"={part.value}")
            assert step_header(k) + " " in t  # the engine's forced header, verbatim
        assert t.count(JOIN_HEADER) == 1 and t.index(JOIN_HEADER) > t.rindex("</step>")
        assert doc.answer == str(p.answer)
        assert block.takeaway.strip().endswith(f"={p.answer}")
        assert rubric.format_score(t) == 0.0  # NPR's rubric: a perfect trajectory
        assert rubric.validate(t) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_make_data_cli(tmp_path, suffix):
    out = tmp_path / f"d{suffix}"
    assert main(["make-data", "--n", "20", "--difficulty", "3", "--seed", "4", "--out", str(out),
                 "--with-traces"]) == 0
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(str(out)).to_pylist()
    assert rows == make_dataset(20, 3, 4, with_traces=True)
    assert all(set(r) == {"id", "prompt", "answer", "trace"} for r in rows)
    assert all(int(r["answer"]) == _reference_answer(r["prompt"]) for r in rows)


def test_make_data_cli_bad_out(tmp_path):
    with pytest.raises(SystemExit, match="jsonl or .parquet"):
        main(["make-data", "--n", "2", "--out", str(tmp_path / "d.csv")])


def test_trace_noise_off_is_unchanged():
    assert make_dataset(200, 1, 7, with_traces=True) == make_dataset(200, 1, 7, with_traces=True, trace_noise=0.0)


def test_trace_noise_slips_are_well_formed_and_wrong():
    clean = make_dataset(1000, 2, 7, with_traces=True)
    noisy = make_dataset(1000, 2, 7, with_traces=True, trace_noise=0.3)
    assert noisy == make_dataset(1000, 2, 7, with_traces=True, trace_noise=0.3)  # seeded
    assert [r["id"] for r in noisy] == [r["id"] for r in clean]  # same problems, true answers
    assert [r["answer"] for r in noisy] == [r["answer"] for r in clean]
    slipped = [r for r in noisy if r.get("trace_correct") is False]
    assert 230 <= len(slipped) <= 370
    for r in noisy:
        boxed = re.search(r"\\boxed\{(-?\d+)\}$", r["trace"]).group(1)
        assert rubric.validate(r["trace"]) == []
        assert (boxed == r["answer"]) == r.get("trace_correct", True)
    for r, c in zip(noisy, clean):
        if r.get("trace_correct") is False:  # exactly one step value differs, by 1 or 2
            diffs = [(int(a), int(b)) for a, b in zip(re.findall(r"=(\d+)</step>", r["trace"]),
                                                     re.findall(r"=(\d+)</step>", c["trace"])) if a != b]
            assert len(diffs) == 1 and 1 <= abs(diffs[0][0] - diffs[0][1]) <= 2
        else:
            assert r["trace"] == c["trace"]
    with pytest.raises(ValueError):
        make_dataset(3, 1, 0, with_traces=True, trace_noise=1.5)


@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_slipped_answers_are_wrong_at_every_level(difficulty):
    for r in make_dataset(300, difficulty, 3, with_traces=True, trace_noise=1.0):
        assert r["trace_correct"] is False
        assert re.search(r"\\boxed\{(-?\d+)\}$", r["trace"]).group(1) != r["answer"]
        assert rubric.validate(r["trace"]) == []
