"""`math`: the last `\\boxed{}` of a response (fallback: a final "the answer is …") checked against the task's
`answer` for mathematical equivalence with math-verify (fractions, decimals, LaTeX, sets, intervals, units,
percentages). Reward +1 / −1.

Time bound: math-verify bounds parsing and sympy work with SIGALRM, which only works in a main thread. In
the pool's worker processes the verifier runs in the main thread and uses it; called from any other thread
(a Ray actor's executor, a user's thread pool) the alarm is skipped and the caller must bound time itself —
the pool does so by killing the worker process on its per-task timeout.
"""
from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Any

from npr_async.format import last_boxed
from npr_async.verifiers.base import Verdict, VerifierError, error_verdict, from_bool

_ANSWER_IS = re.compile(r"answer\s+is\s*[:：]?\s*(.+?)\s*(?:\.\s*)?$", re.IGNORECASE | re.DOTALL)


def extract_answer(response: str) -> tuple[str | None, str]:
    """(answer text, how it was found: "boxed" | "answer_is" | "none")."""
    boxed = last_boxed(response)  # balanced braces; escaped \\{ \\} do not nest
    if boxed is not None:
        return boxed.strip(), "boxed"
    tail = response.strip().splitlines()[-3:]  # a *final* statement only, not any mention earlier on
    m = _ANSWER_IS.search("\n".join(tail))
    if m:
        return m.group(1).strip().strip("$").strip(), "answer_is"
    return None, "none"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _parse(text: str, timeout: int | None):
    from math_verify import parse

    # `$…$` makes math-verify read the whole string as one LaTeX expression; plain text falls back to raw parsing.
    parsed = parse(f"${text}$", parsing_timeout=timeout)
    return parsed if parsed else parse(text, parsing_timeout=timeout)


_NUMBER = re.compile(r"-?\d+(?:\.\d*)?")


def _same_number(gold: str, pred: str) -> bool:
    """Fast path for the common case, two equal plain numbers ("42" vs "42.0"): no LaTeX parse needed.
    Unequal numbers still go to math-verify, whose rounding rules decide."""
    g, p = gold.strip().strip("$").strip(), pred.strip().strip("$").strip()
    return bool(_NUMBER.fullmatch(g) and _NUMBER.fullmatch(p)) and Fraction(g) == Fraction(p)


def equivalent(gold: str, pred: str, timeout_s: int = 5) -> bool:
    """True when `pred` is mathematically equivalent to `gold` (order: gold first, as math-verify expects)."""
    if pred.strip() == gold.strip() or _same_number(gold, pred):
        return True
    timeout = timeout_s if _in_main_thread() else None
    from math_verify import verify

    g, p = _parse(gold, timeout), _parse(pred, timeout)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=timeout))


class MathVerifier:
    def __init__(self, config: Any = None):
        # math-verify wants whole seconds; leave headroom under the pool's per-task timeout
        pool_timeout = float(getattr(config, "timeout_s", 10.0))
        self.timeout_s = max(1, int(pool_timeout / 3))

    def verify(self, task: dict[str, Any], response: str) -> Verdict:
        gold = task.get("answer")
        if gold is None or str(gold).strip() == "":
            raise VerifierError(f"math verifier: task {task.get('id')!r} has no `answer`")
        gold = str(gold)
        pred, source = extract_answer(response)
        if pred is None:
            return from_bool(False, extracted=None, source=source, gold=gold)
        try:
            ok = equivalent(gold, pred, self.timeout_s)
        except Exception as e:  # math-verify's TimeoutException and sympy's own errors alike
            return error_verdict(f"math-verify failed: {type(e).__name__}: {e}"[:500], extracted=pred, gold=gold)
        return from_bool(ok, extracted=pred, source=source, gold=gold)
