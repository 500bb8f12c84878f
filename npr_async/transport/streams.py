"""Per-sender sequence tracking: what a receiver knows about each stream it has heard from.

A stream is (sender name, epoch): a restarted sender gets a new epoch, so its seq 0 is a new stream and not
a duplicate, and the old stream, if it never sent end-of-stream, is reported as truncated.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("npr_async.transport")


class TransportError(RuntimeError):
    pass


class TransportTimeout(TransportError, TimeoutError):
    pass


class MalformedMessage(TransportError, ValueError):
    pass


@dataclass(frozen=True)
class StreamEvent:
    """gap: seqs first..last never arrived; duplicate: seq `first` arrived again (dropped);
    truncated: the stream stopped after `first - 1` without end-of-stream (its sender was replaced or
    declared dead; how many were lost is unknown, `last` is -1); malformed: undecodable bytes."""
    kind: str  # gap | duplicate | truncated | malformed
    sender: str
    epoch: int
    first: int
    last: int
    detail: str = ""

    def __str__(self) -> str:
        rng = f"seq {self.first}" if self.last == self.first else f"seqs {self.first}..{self.last}"
        if self.kind == "truncated":
            rng = f"after seq {self.first - 1}"
        return f"{self.kind} from {self.sender} (epoch {self.epoch}): {rng}{': ' + self.detail if self.detail else ''}"


@dataclass
class Stream:
    sender: str
    epoch: int
    next_seq: int = 0
    received: int = 0
    ended: bool = False  # end-of-stream seen
    truncated: bool = False
    last_seen: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        state = "ended" if self.ended else ("truncated" if self.truncated else "open")
        ago = time.monotonic() - self.last_seen
        return f"{self.sender} up to seq {self.next_seq - 1} ({state}, last heard {ago:.1f}s ago)"


class StreamTracker:
    """Checks each envelope's (sender, epoch, seq); records gaps, duplicates and truncated streams."""

    def __init__(self, on_event: Callable[[StreamEvent], None] | None = None):
        self.streams: dict[tuple[str, int], Stream] = {}
        self.events: list[StreamEvent] = []
        self.lost = 0  # messages known lost (gaps)
        self.duplicates = 0
        self.malformed = 0
        self._on_event = on_event

    def emit(self, ev: StreamEvent) -> None:
        self.events.append(ev)
        log.warning("transport: %s", ev)
        if self._on_event is not None:
            self._on_event(ev)

    def accept(self, sender: str, epoch: int, seq: int, eos: bool = False) -> bool:
        """True if the message is new (deliver it); False for a duplicate (already delivered)."""
        st = self.streams.get((sender, epoch))
        if st is None:
            for old in self.streams.values():  # a new incarnation of this sender: the old one is over
                if old.sender == sender and not old.ended and not old.truncated:
                    self.truncate(old, f"sender restarted as epoch {epoch}")
            st = self.streams[(sender, epoch)] = Stream(sender, epoch)
        st.last_seen = time.monotonic()
        if seq < st.next_seq:
            self.duplicates += 1
            self.emit(StreamEvent("duplicate", sender, epoch, seq, seq))
            return False
        if seq > st.next_seq:
            self.lost += seq - st.next_seq
            self.emit(StreamEvent("gap", sender, epoch, st.next_seq, seq - 1))
        st.next_seq = seq + 1
        st.received += 1
        st.ended = st.ended or eos
        return True

    def truncate(self, st: Stream, why: str) -> None:
        st.truncated = True
        self.emit(StreamEvent("truncated", st.sender, st.epoch, st.next_seq, -1, why))

    def expect(self, sender: str, last_seq: int, epoch: int | None = None) -> int:
        """The sender says it sent seqs up to `last_seq` (e.g. in its StepReport): report the missing tail,
        return how many of them have not arrived."""
        cands = [s for s in self.streams.values() if s.sender == sender and (epoch is None or s.epoch == epoch)]
        st = max(cands, key=lambda s: s.last_seen, default=None)
        if st is None:
            missing, ep, first = last_seq + 1, epoch or 0, 0
        else:
            missing, ep, first = last_seq + 1 - st.next_seq, st.epoch, st.next_seq
        if missing > 0:
            self.emit(StreamEvent("gap", sender, ep, first, last_seq, "not arrived (tail)"))
        return max(missing, 0)

    def stale(self, idle_s: float) -> list[Stream]:
        """Open streams silent for longer than `idle_s`; they are marked truncated (their sender is presumed
        dead), so a later new epoch is not reported twice."""
        now = time.monotonic()
        dead = [s for s in self.streams.values()
                if not s.ended and not s.truncated and now - s.last_seen > idle_s]
        for s in dead:
            self.truncate(s, f"silent for {now - s.last_seen:.1f}s")
        return dead

    def summary(self) -> str:
        if not self.streams:
            return "heard from no sender yet"
        return "heard from: " + "; ".join(s.describe() for s in self.streams.values())
