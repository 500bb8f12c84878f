"""Registry and plug-ins by dotted path. The classes here double as plug-ins for the pool tests
(`test_verifier_plugins:HangVerifier`): real user code, loaded the way a config would name it."""
from __future__ import annotations

import os
import signal
import time

import pytest

from npr_async.config import VerifierConfig
from npr_async.verifiers import VerifierError, get_verifier, register, resolve, task_verifier_name
from npr_async.verifiers.base import Verdict


class ExactMatch:
    """The docs/verifiers.md example: +1 when the response, stripped, equals the task's answer."""

    def __init__(self, config=None):
        self.case_sensitive = config is None or config.default != "exact-nocase"

    def verify(self, task: dict, response: str) -> Verdict:
        a, b = str(task["answer"]).strip(), response.strip()
        ok = a == b if self.case_sensitive else a.lower() == b.lower()
        return Verdict(reward=1.0 if ok else -1.0, correct=ok, details={"expected": a})


class HangVerifier:
    def verify(self, task, response):
        time.sleep(3600)


class CrashVerifier:
    def verify(self, task, response):
        os._exit(3)


class SegfaultVerifier:
    def verify(self, task, response):
        os.kill(os.getpid(), signal.SIGSEGV)


class RaisingVerifier:
    def verify(self, task, response):
        raise RuntimeError("boom in user code")


class NoVerify:
    pass


def test_builtins_and_dotted_paths():
    assert type(get_verifier("math")).__name__ == "MathVerifier"
    for path in ("test_verifier_plugins:ExactMatch", "test_verifier_plugins.ExactMatch"):
        v = get_verifier(path)
        assert v.verify({"answer": "42"}, " 42\n").correct and not v.verify({"answer": "42"}, "41").correct


def test_plugins_from_config_get_the_config():
    cfg = VerifierConfig(default="exact-nocase", plugins={"exact-nocase": "test_verifier_plugins:ExactMatch"})
    v = get_verifier("exact-nocase", cfg)
    assert v.verify({"answer": "Paris"}, "paris").correct  # the config reached __init__


@pytest.mark.parametrize("bad,match", [
    ("nosuchthing", "unknown verifier 'nosuchthing'"),
    ("no_such_pkg.mod:Cls", "cannot import module 'no_such_pkg.mod'"),
    ("test_verifier_plugins:Missing", "has no attribute 'Missing'"),
    ("test_verifier_plugins:NoVerify", "has no verify"),
    (":Cls", "not a known name nor a dotted path"),
])
def test_bad_paths_name_the_problem(bad, match):
    with pytest.raises(VerifierError, match=match):
        get_verifier(bad)


def test_register_and_task_routing():
    register("exact", ExactMatch)
    assert resolve("exact") is ExactMatch
    assert task_verifier_name({"answer": "1"}) == "math"
    assert task_verifier_name({"tests": [{"input": "", "output": ""}]}) == "code"
    assert task_verifier_name({"answer": "1", "verifier": "exact"}) == "exact"
    assert task_verifier_name({"answer": "1"}, default="format") == "format"
