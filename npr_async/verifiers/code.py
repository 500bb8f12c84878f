"""`code`: run the response's Python program against the task's tests inside the sandbox. Reward +1 when
every test passes, −1 otherwise.

The program is the last fenced code block of the response (```python … ``` or ``` … ```), else the whole
response. `task["tests"]` (a list, or that list as a JSON string) holds cases of two kinds:
- stdin/stdout: `{"input": "1 2\\n", "output": "3\\n"}`, one sandboxed run per case; outputs compare line
  by line with trailing whitespace ignored;
- assert-style: `{"assert": "assert add(1, 2) == 3"}` or a bare string; all of them run once, appended to
  the program, and pass when it exits 0.
The APPS / CodeContests layout `{"inputs": [...], "outputs": [...]}` is accepted as stdin/stdout cases.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from npr_async.verifiers.base import Verdict, VerifierError, from_bool
from npr_async.verifiers.sandbox import Limits, Result, run_python

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(response: str) -> str:
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def parse_tests(tests: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """(stdin/stdout cases, assert snippets) from a task's `tests`; a malformed one raises VerifierError."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError:
            tests = [tests]  # a single assert-style snippet
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"], strict=True)]
    if not isinstance(tests, list) or not tests:
        raise VerifierError(f"code verifier: `tests` must be a non-empty list, got {type(tests).__name__}")
    io, asserts = [], []
    for i, case in enumerate(tests):
        if isinstance(case, str):
            asserts.append(case)
        elif isinstance(case, dict) and "assert" in case:
            asserts.append(str(case["assert"]))
        elif isinstance(case, dict) and "input" in case and "output" in case:
            io.append((_text(case["input"]), _text(case["output"])))
        else:
            raise VerifierError(f"code verifier: test {i} is neither {{input, output}} nor an assert: {case!r:.200}")
    return io, asserts


def _text(x: Any) -> str:
    return "\n".join(map(str, x)) + "\n" if isinstance(x, list) else str(x)


def same_output(got: str, want: str) -> bool:
    def norm(s: str) -> list[str]:
        lines = [ln.rstrip() for ln in s.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines
    return norm(got) == norm(want)


def _failure(kind: str, case: int, r: Result, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "case": case, "returncode": r.returncode, "stderr": r.stderr[-500:], **extra}


def _kind(r: Result) -> str | None:
    if r.timed_out:
        return "timeout"
    if r.output_limited:
        return "output_limit"
    if r.returncode != 0:
        return "runtime_error"
    return None


class CodeVerifier:
    def __init__(self, config: Any = None):
        wall = float(getattr(config, "code_timeout_s", 4.0))
        self.limits = Limits(wall_s=wall, cpu_s=max(1, math.ceil(wall)),
                             memory_mb=int(getattr(config, "code_memory_mb", 512)),
                             max_procs=int(getattr(config, "code_max_procs", 32)),
                             output_kb=int(getattr(config, "code_output_kb", 256)))
        self.mode = str(getattr(config, "sandbox", "bwrap"))
        self.python = str(getattr(config, "sandbox_python", ""))

    def run(self, program: str, stdin: str = "") -> Result:
        return run_python(program, stdin, self.limits, mode=self.mode, python=self.python)

    def verify(self, task: dict[str, Any], response: str) -> Verdict:
        if task.get("tests") is None:
            raise VerifierError(f"code verifier: task {task.get('id')!r} has no `tests`")
        io, asserts = parse_tests(task["tests"])
        program = extract_program(response)
        total, passed = len(io) + (1 if asserts else 0), 0
        details: dict[str, Any] = {"total": total, "sandbox": self.mode}
        if asserts:  # one run: the program, then every assert
            r = self.run(program + "\n\n" + "\n".join(asserts) + "\n")
            if (kind := _kind(r)) is not None:
                return from_bool(False, **details, passed=passed, failure=_failure(kind, -1, r))
            passed += 1
        for i, (stdin, want) in enumerate(io):
            r = self.run(program, stdin)
            kind = _kind(r) or (None if same_output(r.stdout, want) else "wrong_output")
            if kind is not None:  # stop at the first failure: the verdict is already −1
                extra = {"stdout": r.stdout[-500:], "expected": want[-500:]} if kind == "wrong_output" else {}
                return from_bool(False, **details, passed=passed, failure=_failure(kind, i, r, **extra))
            passed += 1
        return from_bool(True, **details, passed=passed)
