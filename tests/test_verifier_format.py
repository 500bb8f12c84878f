"""Format reward rules per stage, on real NPR-shaped responses."""
from __future__ import annotations

import pytest

from npr_async.verifiers import Verdict, get_verifier
from npr_async.verifiers.format import combine

GOOD = ("<guideline>\n<plan>1: try small cases</plan>\n<plan>2: find the pattern</plan>\n</guideline>\n"
        "<step>\n1: n=1 gives 2, n=2 gives 4\n</step>\n<step>\n2: it doubles each time\n</step>\n"
        "<takeaway>\nboth agree: 2^n\n</takeaway>\nSo the answer is \\boxed{8}.")
SHORT_PLAN = GOOD.replace("1: try small cases", "1:")  # a plan shorter than 3 characters: -0.4
MISMATCH = GOOD.replace("<step>\n2: it doubles each time\n</step>\n", "")  # 2 plans, 1 step: -1.0
PLAIN = "I just compute it: \\boxed{8}"  # no block at all: -1.5


def test_standalone_format_verifier():
    v = get_verifier("format")
    assert v.verify({}, GOOD).reward == 0.0 and v.verify({}, GOOD).correct
    assert v.verify({}, SHORT_PLAN).reward == pytest.approx(-0.4)
    assert v.verify({}, MISMATCH).reward == -1.0
    assert v.verify({}, PLAIN).reward == -1.5 and not v.verify({}, PLAIN).correct


@pytest.mark.parametrize("text,score", [(GOOD, 0.0), (SHORT_PLAN, -0.4), (MISMATCH, -1.0), (PLAIN, -1.5)])
def test_stage1_penalty_replaces_the_answer_reward(text, score):
    answer = get_verifier("math").verify({"answer": "8"}, text)
    assert answer.correct
    v = combine(answer, text, "stage1")
    assert v.reward == pytest.approx(1.0 if score == 0.0 else score)
    assert -2.0 <= v.reward and (v.reward == 1.0 or v.reward < 0)
    assert v.correct and v.details["format_ok"] is (score == 0.0) and v.details["answer_reward"] == 1.0


def test_stage1_wrong_answer_with_good_format_keeps_minus_one():
    wrong = get_verifier("math").verify({"answer": "9"}, GOOD)
    assert combine(wrong, GOOD, "stage1").reward == -1.0


@pytest.mark.parametrize("text,ok", [(GOOD, True), (SHORT_PLAN, True), (MISMATCH, False), (PLAIN, False)])
def test_filter_flags_malformed_and_keeps_the_answer_reward(text, ok):
    answer = get_verifier("math").verify({"answer": "8"}, text)
    v = combine(answer, text, "filter")
    assert v.reward == 1.0 and v.details["format_ok"] is ok
    assert ("format_errors" in v.details) is (not ok)


def test_none_mode_and_bad_mode():
    v = combine(Verdict(reward=-1.0, correct=False), PLAIN, "none")
    assert v.reward == -1.0 and v.details["format_ok"] and v.details["format_score"] == -1.5
    with pytest.raises(ValueError, match="format_reward"):
        combine(v, PLAIN, "stage9")
