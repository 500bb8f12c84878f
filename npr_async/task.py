"""The synthetic verifiable task: problems whose parts are independent sub-computations.

"Let A = 3+4, B = 6+2. What is A+B?"  Each part is one plan and one parallel step (a step never needs
its siblings), the takeaway combines the part values, and the answer is an exact integer. The
solution traces are correct NPR-format responses (format score 0.0): the stand-in for self-distilled
Stage 2 data when no pretrained model is at hand. Kept short so a tiny model learns them on a CPU.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from npr_async.tags import GUIDELINE, GUIDELINE_END, JOIN_HEADER, PLAN, PLAN_END, STEP_END, TAKEAWAY_END, step_header

NAMES = "ABCDE"  # one letter per part: at most 5 parts, NPR's plan limit


@dataclass(frozen=True)
class Level:
    parts: tuple[int, int]  # min, max number of parts (inclusive)
    operand: tuple[int, int]  # operand range (inclusive)
    terms: tuple[int, int]  # operands per part
    part_ops: str  # operators inside a part
    combine_ops: str  # operators between parts in the final expression


# Difficulty 1..8. Level 2 (the default) is single-digit sums of 2-3 parts: learnable by SFT in minutes
# but not saturated, so RL has room; later levels add ×, −, more parts and larger operands.
LEVELS = {
    1: Level((2, 2), (1, 9), (2, 2), "+", "+"),
    2: Level((2, 3), (1, 9), (2, 2), "+", "+"),
    3: Level((2, 3), (1, 9), (2, 2), "+*", "+"),
    4: Level((2, 4), (1, 9), (2, 3), "+*", "+-"),
    5: Level((3, 4), (1, 20), (2, 3), "+-*", "+-"),
    6: Level((3, 5), (1, 50), (2, 3), "+-*", "+-"),
    7: Level((4, 5), (1, 99), (2, 3), "+-*", "+-*"),
    8: Level((5, 5), (10, 999), (3, 3), "+-*", "+-*"),
}


@dataclass(frozen=True)
class Part:
    name: str  # "A"
    expr: str  # "3+4"
    value: int


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: int
    parts: tuple[Part, ...]
    combine: str  # the final expression over the part names, e.g. "A+B-C"


def evaluate(expr: str, env: dict[str, int] | None = None) -> int:
    """Exact value of an integer expression of + - * over digits and part names (usual precedence)."""
    env = env or {}
    tokens: list[str] = []
    i = 0
    while i < len(expr):
        c = expr[i]
        if c.isdigit():
            j = i
            while j < len(expr) and expr[j].isdigit():
                j += 1
            tokens.append(expr[i:j])
            i = j
        elif c in "+-*" or c in env:
            tokens.append(c)
            i += 1
        else:
            raise ValueError(f"bad character {c!r} in expression {expr!r}")
    if len(tokens) % 2 == 0:
        raise ValueError(f"malformed expression {expr!r}")
    # sum of products: a term is a product, terms are joined by + or -
    total, sign, product = 0, 1, None
    for k, tok in enumerate(tokens):
        if k % 2 == 0:
            if tok in "+-*":
                raise ValueError(f"malformed expression {expr!r}")
            v = env[tok] if tok in env else int(tok)
            product = v if product is None else product * v
        elif tok == "*":
            continue
        elif tok in "+-":
            total += sign * product
            sign, product = (1 if tok == "+" else -1), None
        else:
            raise ValueError(f"malformed expression {expr!r}")
    return total + sign * product


def make_problem(rng: random.Random, difficulty: int) -> Problem:
    """One problem drawn from `rng` at `difficulty` (1..8)."""
    if difficulty not in LEVELS:
        raise ValueError(f"difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}")
    lv = LEVELS[difficulty]
    n = rng.randint(*lv.parts)
    parts = []
    for name in NAMES[:n]:
        nums = [str(rng.randint(*lv.operand)) for _ in range(rng.randint(*lv.terms))]
        expr = nums[0] + "".join(rng.choice(lv.part_ops) + x for x in nums[1:])
        parts.append(Part(name, expr, evaluate(expr)))
    combine = NAMES[0] + "".join(rng.choice(lv.combine_ops) + x for x in NAMES[1:n])
    answer = evaluate(combine, {p.name: p.value for p in parts})
    defs = ", ".join(f"{p.name} = {p.expr}" for p in parts)
    question = f"Let {defs}. What is {combine}?"
    pid = f"d{difficulty}-{rng.getrandbits(48):012x}"
    return Problem(pid, question, answer, tuple(parts), combine)


def _substituted(problem: Problem) -> str:
    """The final expression with each part name replaced by its value; negatives in parentheses."""
    values = {p.name: p.value for p in problem.parts}
    return "".join(f"({values[c]})" if c in values and values[c] < 0 else str(values.get(c, c))
                   for c in problem.combine)


def solution_trace(problem: Problem) -> str:
    """A correct NPR response: one plan and one parallel step per part, a takeaway, the boxed answer.

    The step headers and the join header are exactly what the engine forces (`tags.step_header`,
    `tags.JOIN_HEADER`), so the trace is also a valid engine continuation token for token.
    """
    plans = "".join(f"{PLAN}{k}: {p.name}={p.expr}{PLAN_END}\n" for k, p in enumerate(problem.parts, 1))
    steps = "".join(f"{step_header(k)} {p.name}={p.expr}={p.value}{STEP_END}"
                    for k, p in enumerate(problem.parts, 1))
    takeaway = f"{problem.combine}={_substituted(problem)}={problem.answer}"
    return (f"{GUIDELINE}\n{plans}{GUIDELINE_END}{steps}{JOIN_HEADER}{takeaway}{TAKEAWAY_END}\n"
            f"\\boxed{{{problem.answer}}}")


SLIPS = (-2, -1, 1, 2)  # how far a weak teacher's slipped part value lands from the true one


def slipped_trace(problem: Problem, rng: random.Random) -> str:
    """An imperfect teacher's trace: well-formed, but one part's step value is off by a small amount
    (`SLIPS`) and the takeaway carries the wrong value on consistently, so the boxed answer is wrong."""
    k = rng.randrange(len(problem.parts))
    part = problem.parts[k]
    value = part.value + rng.choice([d for d in SLIPS if part.value + d >= 0] or [1])
    parts = problem.parts[:k] + (Part(part.name, part.expr, value),) + problem.parts[k + 1:]
    wrong = evaluate(problem.combine, {p.name: p.value for p in parts})
    if wrong == problem.answer:  # the slip cancels out (a part multiplied by 0): slip the answer itself
        wrong += 1
    return solution_trace(Problem(problem.id, problem.question, wrong, parts, problem.combine))


def make_problems(n: int, difficulty: int, seed: int) -> list[Problem]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"npr-task:{seed}:{difficulty}")  # str seeds are stable across runs/platforms
    return [make_problem(rng, difficulty) for _ in range(n)]


def make_dataset(n: int, difficulty: int, seed: int, with_traces: bool = False,
                 trace_noise: float = 0.0) -> list[dict]:
    """Rows `{id, prompt, answer}` (answer as a string, as `\\boxed{}` holds it); `+ trace` if asked.

    `trace_noise` (the imperfect-teacher knob, traces only): that fraction of the traces (a seeded draw,
    independent of the problems) carries one arithmetic slip (`slipped_trace`), so its boxed answer is
    wrong, and the row says `trace_correct: False`. The rows' `answer` is always the true one, so a
    verifier still rewards only correct answers. 0.0 gives the same rows as before, byte for byte.
    """
    if not 0.0 <= trace_noise <= 1.0:
        raise ValueError(f"trace_noise must be in [0, 1], got {trace_noise!r}")
    rows = []
    slip_rng = random.Random(f"npr-task-slips:{seed}:{difficulty}")
    for p in make_problems(n, difficulty, seed):
        row = {"id": p.id, "prompt": p.question, "answer": str(p.answer)}
        if with_traces:
            if trace_noise > 0.0 and slip_rng.random() < trace_noise:
                row["trace"], row["trace_correct"] = slipped_trace(p, slip_rng), False
            else:
                row["trace"] = solution_trace(p)
        rows.append(row)
    return rows
