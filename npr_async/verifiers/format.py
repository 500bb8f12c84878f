"""`format`: NPR's format score as a verifier, and the per-stage rules that combine it with an answer verdict.

`verifier.format_reward` chooses the rule (NPR-FACTS.md, "PAPO (Stage 3) as published"):
- `stage1` (DAPO, tags as plain text): the format check passes only at score 0.0; when it fails, the format
  penalty (the score, in [-2, 0)) *replaces* the answer reward. `correct` still reports the answer.
- `filter` (Stage 3): the reward is the answer reward; a structurally malformed response (npr_async.format's
  validator: no block, tags out of order, plan/step mismatch, bad plan ids, too deep) gets
  `details["format_ok"] = False`, and the learner's structural filter drops it instead of training on it.
- `none`: the answer verdict unchanged (the score is still reported).
Every rule records `details["format_score"]` and `details["format_ok"]`.
"""
from __future__ import annotations

from typing import Any

from npr_async.format_score import score_format, validate
from npr_async.verifiers.base import Verdict

MODES = ("none", "stage1", "filter")


def combine(answer: Verdict, response: str, mode: str, max_plans: int = 5, max_depth: int = 5) -> Verdict:
    """The final verdict of `response` from its answer verdict under the stage's rule."""
    if mode not in MODES:
        raise ValueError(f"format_reward must be one of {MODES}, got {mode!r}")
    fs = score_format(response)
    details: dict[str, Any] = {**answer.details, "format_score": fs.score}
    if mode == "stage1":
        ok = fs.score == 0.0
        details.update(format_ok=ok, answer_reward=answer.reward)
        if not ok:
            details["format_reasons"] = fs.reasons[:8]
        return Verdict(reward=answer.reward if ok else fs.score, correct=answer.correct, details=details)
    if mode == "filter":
        errors = validate(response, max_plans=max_plans, max_depth=max_depth)
        details["format_ok"] = not errors
        if errors:
            details["format_errors"] = errors[:8]
        return Verdict(reward=answer.reward, correct=answer.correct, details=details)
    details["format_ok"] = True
    return Verdict(reward=answer.reward, correct=answer.correct, details=details)


class FormatVerifier:
    """Standalone: reward = NPR format score (0.0 perfect, down to -2.0), correct = score is exactly 0."""

    def verify(self, task: dict[str, Any], response: str) -> Verdict:
        fs = score_format(response)
        return Verdict(reward=fs.score, correct=fs.score == 0.0,
                       details={"format_score": fs.score, "format_reasons": fs.reasons[:8]})
