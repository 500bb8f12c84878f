"""`GcPauses`: the cyclic garbage collector's pauses while a block runs, by generation.

A full (generation-2) collection walks every tracked object of the process; in an engine process that is the
model, tokenizer, CUDA graphs and compiler state, and one collection stalled a 1.2-s rollout call for 0.8 s on an
H200 host (BENCHMARKS.md, session 13). `LLM` freezes the heap at its first call (`LLM.freeze_heap`) and reports
each call's pauses in `last_stats` (`gc_ms`, `gc_full`), so a stall that comes back shows in the rollout metrics.
"""
from __future__ import annotations

import gc
import time


class GcPauses:
    """with GcPauses() as p: ...  then p.by_generation = {generation: [collections, ms]}."""

    def __init__(self):
        self.by_generation: dict[int, list] = {}
        self._t0 = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            rec = self.by_generation.setdefault(info["generation"], [0, 0.0])
            rec[0] += 1
            rec[1] += 1e3 * (time.perf_counter() - self._t0)

    @property
    def ms(self) -> float:
        return sum(ms for _, ms in self.by_generation.values())

    @property
    def full(self) -> int:
        return self.by_generation.get(2, [0])[0]
