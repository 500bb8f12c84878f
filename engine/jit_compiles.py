"""`TritonCompiles`: the Triton JIT compilations while a block runs, by kernel.

Triton compiles a `@triton.jit` kernel once per specialisation: its constexprs, and for every other argument
whether an int is 1 or divisible by 16 and whether a pointer is 16-byte aligned. An eager engine step whose
shapes form a combination this process has not seen compiles on the host in the middle of a call (~0.3-1 s
with a cold cache, a disk load with a warm one), so a rollout call on a fresh machine can run slower than the
same call later for no reason the GPU shows. `LLM.generate` reports each call's compilations in `last_stats`
(`jit_compiles`, `jit_ms`). Without Triton (CPU-only installs) the counts stay zero.
"""
from __future__ import annotations

import time
from collections import Counter

try:
    from triton import knobs
except ImportError:  # no Triton, or one older than its knobs (3.4): no hooks to count with
    knobs = None
if knobs is not None and not hasattr(knobs.runtime, "jit_post_compile_hook"):
    knobs = None


class TritonCompiles:
    """with TritonCompiles() as c: ...  then c.count, c.ms, c.by_kernel = Counter({kernel name: compiles}) and
    c.signatures (the first `KEEP`: which argument properties were new). Chains to hooks installed before it
    and puts them back on exit."""
    KEEP = 32

    def __init__(self):
        self.count, self.ms, self.by_kernel, self.signatures = 0, 0.0, Counter(), []
        self._t0: float | None = None
        self._prev = None

    def __enter__(self) -> TritonCompiles:
        if knobs is not None:
            rt = knobs.runtime
            self._prev = (rt.jit_cache_hook, rt.jit_post_compile_hook)
            rt.jit_cache_hook, rt.jit_post_compile_hook = self.before, self.after
        return self

    def __exit__(self, *exc) -> None:
        if knobs is not None and self._prev is not None:
            knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._prev
            self._prev = None

    def before(self, **kw):
        """Triton's `jit_cache_hook`: a compilation starts. A true result would skip it: pass the earlier
        hook's on."""
        self._t0 = time.perf_counter()
        prev = self._prev[0] if self._prev else None
        return prev(**kw) if prev is not None else None

    def after(self, **kw):
        """Triton's `jit_post_compile_hook`: the compilation (or its load from the disk cache) is done."""
        if self._t0 is not None:
            self.ms += 1e3 * (time.perf_counter() - self._t0)
            self._t0 = None
        self.count += 1
        fn = kw.get("fn")
        self.by_kernel[getattr(fn, "name", None) or "?"] += 1
        if len(self.signatures) < self.KEEP:
            self.signatures.append(kw.get("repr", "?"))
        prev = self._prev[1] if self._prev else None
        return prev(**kw) if prev is not None else None
