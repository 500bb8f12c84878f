"""Device-busy time of work the host enqueues asynchronously (the streaming learner's compute).

The learner's host returns from a group's forward + backward long before the GPU has run it, then waits for
the next group: timing the host calls counts that GPU work as idle (2 x H200, session 10: 1.4 s of "compute"
for 48k tokens while interleaved with rollouts, 2.3 s when the same work ran after them). `BusyClock`
brackets each piece of work with CUDA events on the current stream instead. The GPU reaches an opening event
only after the work enqueued before it, so the bracketed spans never overlap, and their sum is the time the
device spent on that work (gaps inside a span where it waited for the host count, as they belong to the
work). On a CPU the work is synchronous: wall-clock time of the spans.
"""
from __future__ import annotations

import time

import torch


class BusyClock:
    """`with clock: work()` (or start / stop); `seconds()` is the busy time so far."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._open: torch.cuda.Event | float | None = None
        self._spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    def start(self) -> None:
        if self._open is not None:
            raise RuntimeError("BusyClock.start(): the previous span is still open (stop() it first)")
        self._open = self._mark()

    def stop(self) -> None:
        if self._open is None:
            raise RuntimeError("BusyClock.stop() without start()")
        opened, self._open = self._open, None
        if self.cuda:
            self._spans.append((opened, self._mark()))
        else:
            self._seconds += time.perf_counter() - opened

    def seconds(self) -> float:
        """Busy seconds of the closed spans; on a GPU it waits until the device has run them."""
        if self._spans:
            self._spans[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._spans) / 1e3
            self._spans.clear()
        return self._seconds

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __enter__(self) -> BusyClock:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
