"""Table-driven math equivalence: every row hand-checked (gold, model answer, should they match)."""
from __future__ import annotations

import pytest

from npr_async.verifiers import get_verifier
from npr_async.verifiers.math import extract_answer, last_boxed

Y, N = True, False
CASES = [
    # fractions and LaTeX fraction spellings
    (r"\frac12", "0.5", Y), (r"\frac{1}{2}", r"\dfrac{1}{2}", Y), (r"\frac12", r"\tfrac{1}{2}", Y),
    ("1/2", "0.5", Y), ("0.5", r"\frac{2}{4}", Y), (r"\frac{1}{2}", r"\frac{2}{4}", Y), (r"\dfrac{3}{4}", "0.75", Y),
    (r"\frac{-3}{4}", r"-\frac34", Y), (r"-\frac{3}{4}", "-0.75", Y), (r"-\frac{3}{4}", "0.75", N),
    (r"\frac{1}{2}", r"\frac{1}{3}", N), (r"\frac12", "0.51", N), (r"\frac{7}{3}", r"2\frac{1}{3}", Y),
    (r"\frac{1}{3}", "0.33", N), ("0.3333333", r"\frac13", Y), (r"\frac{10}{4}", "2.5", Y), ("5/2", r"\frac{5}{2}", Y),
    # roots
    (r"\frac{\sqrt2}{2}", r"\sqrt{2}/2", Y), (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", Y),
    (r"\sqrt{8}", r"2\sqrt{2}", Y), (r"\sqrt{2}", "1.41421356", Y), (r"\sqrt{3}", r"\sqrt{2}", N),
    (r"2\sqrt{3}", r"\sqrt{12}", Y), (r"\sqrt[3]{27}", "3", Y), (r"\sqrt{2}+1", r"1+\sqrt{2}", Y), (r"\sqrt{2}-1", r"1-\sqrt{2}", N),
    # integers, decimals, signs
    ("3", "3.0", Y), ("3", "3.01", N), ("-1", "1", N), ("0", "-0", Y), ("42", "42", Y), ("42", "24", N),
    ("1000", "1,000", Y), ("1000000", "1,000,000", Y), ("1000000", r"10^6", Y), ("2^{10}", "1024", Y),
    ("0.1", "0.10", Y), ("0.1", "0.01", N), ("-2.5", r"-\frac52", Y), ("7", "-7", N), ("100", "1000", N),
    # percentages (math-verify reads `10\%` as 0.1 and also accepts the bare number)
    (r"10\%", "10", Y), (r"10\%", "0.1", Y), ("0.75", r"75\%", Y), (r"50\%", r"\frac12", Y), (r"10\%", "20", N),
    # units and text
    (r"5\text{ cm}", "5", Y), (r"5\text{ cm}", r"5 \text{cm}", Y), (r"12\text{ meters}", "12", Y), ("12", r"\$12", Y),
    (r"5\text{ cm}", "6", N), ("45^\\circ", "45", Y), (r"90^{\circ}", "90", Y), (r"30^\circ", "60", N),
    (r"\text{yes}", "yes", Y), (r"\mathrm{(C)}", "C", Y), ("A", "A", Y), ("A", "B", N), (r"\textbf{(B)}", "B", Y),
    # pi, symbolic constants, expressions
    (r"\pi", r"\pi", Y), (r"2\pi", r"\pi \cdot 2", Y), (r"\pi", "3.14159", N), (r"\frac{\pi}{2}", r"\pi/2", Y),
    (r"\frac{\pi}{3}", r"\frac{\pi}{6}", N), ("x^2+2x+1", "(x+1)^2", Y), ("x^2-1", "(x-1)(x+1)", Y),
    ("x^2+1", "(x+1)^2", N), (r"\log_2 8", "3", Y), (r"\binom{5}{2}", "10", Y), ("5!", "120", Y), ("2x", "x+x", Y),
    (r"\frac{x}{2}", "0.5x", Y), ("3a+2b", "2b+3a", Y), ("3a+2b", "3b+2a", N), (r"e^{2}", r"e \cdot e", Y),
    # \left( \right) delimiters, tuples, intervals
    (r"\left( 1, 2 \right)", "(1,2)", Y), ("(1,2)", "[1,2)", N), (r"[1,2)", r"x \in [1,2)", Y),
    (r"(-\infty, 3]", r"(-\infty,3]", Y), (r"(-\infty, 3]", r"(-\infty,3)", N), (r"[0, \infty)", r"[0,\infty)", Y),
    (r"(0,1)\cup(2,3)", r"(2,3)\cup(0,1)", Y), (r"(0,1)\cup(2,3)", r"(0,1)\cup(2,4)", N), ("[1,2]", "[1,3]", N),
    (r"\left[ \frac{1}{2}, 1 \right]", "[0.5, 1]", Y), ("(3,4)", "(4,3)", N),
    # sets and lists of values
    (r"\{1,2\}", r"\{2,1\}", Y), ("1,2,3", "3,2,1", Y), ("1,2,3", r"\{1,2,3\}", Y), (r"\{1,2\}", r"\{1,3\}", N),
    (r"\{1,2\}", r"\{1,2,3\}", N), ("-2, 3", "3, -2", Y), ("-2, 3", "2, 3", N),
    # equations and relations
    ("x=5", "5", Y), ("5", "x=5", Y), ("x = 5", "x=6", N), (r"y = 2x + 1", r"y=1+2x", Y), (r"y=2x+1", "2x+1", Y),
    (r"x \le 3", r"x\leq 3", Y), (r"\infty", r"\infty", Y), (r"\infty", r"-\infty", N),
    # matrices
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", Y),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}", N),
    (r"\begin{pmatrix}1 & 0\\0 & 1\end{pmatrix}", r"\begin{bmatrix}1&0\\0&1\end{bmatrix}", Y),
    # words and things that are not mathematics
    ("2", "two", N), ("12", "", N), ("12", "twelve apples", N), ("7", "7.5", N), (r"\frac{1}{2}", r"\frac{1}{2}x", N),
]


def _ids():
    return [f"{i}:{g}|{p}" for i, (g, p, _) in enumerate(CASES)]


def test_at_least_100_cases():
    assert len(CASES) >= 100
    assert sum(1 for *_, y in CASES if not y) >= 30  # negatives that must not match


@pytest.mark.parametrize("gold,pred,expected", CASES, ids=_ids())
def test_math_equivalence(gold, pred, expected):
    verdict = get_verifier("math").verify({"id": "t", "answer": gold}, f"Thus the result is \\boxed{{{pred}}}.")
    assert verdict.correct is expected, verdict.details
    assert verdict.reward == (1.0 if expected else -1.0)


@pytest.mark.parametrize("text,answer,source", [
    (r"first \boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}", "boxed"),
    (r"nested \boxed{\frac{a}{\sqrt{b}}} end", r"\frac{a}{\sqrt{b}}", "boxed"),
    (r"escaped \boxed{\{1, 2\}}", r"\{1, 2\}", "boxed"),
    ("some work\nSo the answer is 42.", "42", "answer_is"),
    ("The final answer is: $\\frac{3}{4}$", r"\frac{3}{4}", "answer_is"),
    ("no answer here at all", None, "none"),
    (r"unbalanced \boxed{3 and more", None, "none"),
])
def test_extraction(text, answer, source):
    assert extract_answer(text) == (answer, source)


def test_last_boxed_prefers_last_and_skips_unbalanced():
    assert last_boxed(r"\boxed{2} \boxed{3") == "2"
    assert last_boxed(r"\fbox{5}") == "5"


def test_npr_response_and_missing_answer():
    v = get_verifier("math")
    npr = ("<guideline>\n<plan>1: add</plan>\n</guideline>\n<step>\n1: 2+2=4\n</step>\n"
           "<takeaway>\nit is 4\n</takeaway>\nSo \\boxed{4}")
    assert v.verify({"answer": "4"}, npr).correct
    assert not v.verify({"answer": "4"}, "I think it is four").correct
    with pytest.raises(ValueError, match="no `answer`"):
        v.verify({"id": "q1"}, r"\boxed{4}")
