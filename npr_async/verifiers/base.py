"""The verifier contract: `verify(task, response) -> Verdict`, plus the error verdict every failure maps to.

A task is a dataset row (`id`, `prompt`, `answer` or `tests`, optional `verifier`); a response is the model's
generated text. Verifiers are plain classes, constructed once per worker process and called many times.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import msgspec

CORRECT, WRONG = 1.0, -1.0


class Verdict(msgspec.Struct, kw_only=True):
    reward: float
    correct: bool
    details: dict[str, Any] = {}


class VerifierError(ValueError):
    """A verifier cannot be found, built or applied to a task (bad dotted path, missing `answer`, …)."""


@runtime_checkable
class Verifier(Protocol):
    """Built-ins and user plug-ins. `__init__` takes no argument, or one named `config` (a VerifierConfig)."""

    def verify(self, task: dict[str, Any], response: str) -> Verdict: ...


def error_verdict(error: str, **details: Any) -> Verdict:
    """What a crash, hang or refusal of a verifier turns into: reward −1, never an exception for the caller."""
    return Verdict(reward=WRONG, correct=False, details={"error": error, **details})


def from_bool(ok: bool, **details: Any) -> Verdict:
    return Verdict(reward=CORRECT if ok else WRONG, correct=ok, details=details)
