"""Verifier registry: built-in names, user plug-ins by dotted path, one constructed instance per process.

    get_verifier("math")                          # a built-in
    get_verifier("my_pkg.checks:ExactMatch")      # a user class (or "my_pkg.checks.ExactMatch")
    get_verifier("exact", config=cfg.verifier)    # a name from `verifier.plugins: {exact: my_pkg.checks:ExactMatch}`

Modules are imported only when a verifier is first asked for, so `import npr_async.verifiers` stays cheap.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

import msgspec

from npr_async.verifiers.base import Verdict, Verifier, VerifierError, error_verdict, from_bool

__all__ = ["BUILTINS", "Verdict", "Verifier", "VerifierError", "error_verdict", "from_bool", "get_verifier",
           "register", "resolve", "task_verifier_name"]

BUILTINS: dict[str, str] = {
    "math": "npr_async.verifiers.math:MathVerifier",
    "code": "npr_async.verifiers.code:CodeVerifier",
    "format": "npr_async.verifiers.format:FormatVerifier",
}
_registered: dict[str, Any] = {}  # name -> class, from register()
_instances: dict[tuple, Verifier] = {}


def register(name: str, cls: type) -> None:
    """Register a verifier class under a name (in the process that will use it)."""
    _registered[name] = cls


def _load_dotted(path: str) -> Any:
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise VerifierError(f"verifier {path!r}: not a known name nor a dotted path `pkg.module:Class`")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise VerifierError(f"verifier {path!r}: cannot import module {module_name!r}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise VerifierError(f"verifier {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def resolve(name_or_dotted: str, plugins: dict[str, str] | None = None) -> Any:
    """The class (or factory) a name or dotted path refers to; a bad one raises VerifierError naming it."""
    if name_or_dotted in _registered:
        return _registered[name_or_dotted]
    target = (plugins or {}).get(name_or_dotted) or BUILTINS.get(name_or_dotted)
    if target is None and "." not in name_or_dotted and ":" not in name_or_dotted:
        known = sorted({*BUILTINS, *_registered, *(plugins or {})})
        raise VerifierError(f"unknown verifier {name_or_dotted!r}; known: {known}, or a dotted path pkg.module:Class")
    return _load_dotted(target or name_or_dotted)


def get_verifier(name_or_dotted: str, config: Any = None) -> Verifier:
    """A ready verifier instance, cached per (name, config). `config` is a VerifierConfig (or None)."""
    plugins = dict(getattr(config, "plugins", None) or {})
    key = (name_or_dotted, msgspec.json.encode(config) if config is not None else b"")
    if key in _instances:
        return _instances[key]
    cls = resolve(name_or_dotted, plugins)
    try:
        takes_config = "config" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes_config = False
    try:
        inst = cls(config=config) if takes_config else cls()
    except Exception as e:
        raise VerifierError(f"verifier {name_or_dotted!r}: constructing {cls!r} failed: {e!r}") from None
    if not callable(getattr(inst, "verify", None)):
        raise VerifierError(f"verifier {name_or_dotted!r}: {cls!r} has no verify(task, response) method")
    _instances[key] = inst
    return inst


def task_verifier_name(task: dict[str, Any], default: str = "math") -> str:
    """The verifier a dataset row asks for: its `verifier` field, else `code` when it has tests, else default."""
    name = task.get("verifier")
    if name:
        return str(name)
    if task.get("tests") is not None and task.get("answer") is None:
        return "code"
    return default
