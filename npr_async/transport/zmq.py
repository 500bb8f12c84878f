"""Trajectory channels: PUSH (many senders) → PULL (one receiver), msgspec msgpack `Envelope`s.

- Backpressure: SNDHWM/RCVHWM bound the queues (in messages); a full queue blocks `send` up to
  `send_timeout_s` (0: block until the receiver drains), then raises `TransportTimeout` naming the peer.
  A timed-out message was never queued, so it consumes no sequence number.
- Loss and duplication: `Envelope.seq` per (sender, epoch), checked by `StreamTracker` (`rx.tracker`).
- Bounded receives: `recv(timeout_s)` raises `TransportTimeout` naming the endpoint, the peer waited on,
  and every sender heard from so far.
- Malformed bytes: `MalformedMessage` (on_malformed="raise") or counted and skipped ("count"); either way
  the socket stays usable.
- Shutdown: `close()` sends end-of-stream (an `Ack(kind="eos")`), then closes with a bounded linger.
"""
from __future__ import annotations

import os
import random
import socket as _socket
import time

import msgspec
import zmq

from npr_async.messages import Ack, Envelope, Message
from npr_async.transport.endpoints import connect_address, ipc_path
from npr_async.transport.streams import MalformedMessage, StreamEvent, StreamTracker, TransportTimeout

_ZERO_COPY_BYTES = 64 * 1024  # pyzmq: zero-copy sends only pay off for large frames
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def encode(env: Envelope) -> bytes:
    return _encoder.encode(env)


def decode(data) -> Envelope:
    return _decoder.decode(data)


def _ms(timeout_s: float | None) -> int:
    return -1 if not timeout_s else max(int(timeout_s * 1000), 1)


class TrajectorySender:
    """PUSH side. `endpoint`: the receiver's connect address (`rx.address`). `name`: stable sender name
    (e.g. "rollout-3"); each instance gets a fresh `epoch`."""

    def __init__(self, endpoint: str, *, name: str | None = None, hwm: int = 1024,
                 send_timeout_s: float = 300.0, linger_s: float = 1.0, peer: str = "receiver",
                 ctx: zmq.Context | None = None):
        self.endpoint, self.peer, self.hwm = endpoint, peer, hwm
        self.name = name or f"{_socket.gethostname()}-{os.getpid()}"
        self.epoch = time.time_ns() ^ random.getrandbits(20)  # unique per incarnation
        self.seq = 0  # next sequence number
        self.send_timeout_s, self.linger_s = send_timeout_s, linger_s
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
        self._sock.connect(endpoint)
        self._timeout_set: int | None = None
        self.closed = False

    def send(self, body: Message, timeout_s: float | None = None) -> int:
        """Queue one message; returns its sequence number. Blocks while the queue is full (backpressure)."""
        timeout_s = self.send_timeout_s if timeout_s is None else timeout_s
        ms = _ms(timeout_s)
        if ms != self._timeout_set:
            self._sock.setsockopt(zmq.SNDTIMEO, ms)
            self._timeout_set = ms
        data = encode(Envelope(self.name, self.epoch, self.seq, time.time_ns(), body))
        try:
            self._sock.send(data, copy=len(data) < _ZERO_COPY_BYTES)
        except zmq.Again:
            raise TransportTimeout(
                f"{self.name}: send of seq {self.seq} to {self.peer} at {self.endpoint} timed out after "
                f"{timeout_s}s: queue full (hwm={self.hwm} messages) — {self.peer} is not draining") from None
        self.seq += 1
        return self.seq - 1

    def close(self, eos: bool = True) -> None:
        """Send end-of-stream (bounded by the linger time), then close the socket."""
        if self.closed:
            return
        self.closed = True
        try:
            if eos:
                self.send(Ack(kind="eos", ref_sender=self.name, ref_seq=self.seq - 1),
                          timeout_s=max(self.linger_s, 0.001))
        except TransportTimeout:
            pass  # the receiver is gone or full: it will see this stream as truncated
        finally:
            self._sock.close(linger=int(self.linger_s * 1000))
            if self._own_ctx:
                self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TrajectoryReceiver:
    """PULL side: binds `endpoint` (from `make_endpoint`); hand `address` to the senders."""

    def __init__(self, endpoint: str, *, hwm: int = 1024, timeout_s: float = 300.0, peer: str = "senders",
                 on_malformed: str = "count", on_event=None, max_msg_bytes: int = 0,
                 ctx: zmq.Context | None = None):
        if on_malformed not in ("count", "raise"):
            raise ValueError(f"on_malformed must be 'count' or 'raise', got {on_malformed!r}")
        self.peer, self.timeout_s, self.on_malformed = peer, timeout_s, on_malformed
        self.tracker = StreamTracker(on_event)
        self.received = 0
        self.bytes = 0
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        if max_msg_bytes:
            self._sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)  # a larger frame drops the connection
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.address = connect_address(self.endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self.closed = False

    # counters the actors export as metrics
    @property
    def gaps(self) -> list[StreamEvent]:
        return [e for e in self.tracker.events if e.kind in ("gap", "truncated")]

    @property
    def lost(self) -> int:
        return self.tracker.lost

    @property
    def duplicates(self) -> int:
        return self.tracker.duplicates

    @property
    def malformed(self) -> int:
        return self.tracker.malformed

    def recv(self, timeout_s: float | None = None) -> Envelope:
        """The next new message (duplicates and end-of-stream markers are consumed, not returned)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._poller.poll(max(int(left * 1000), 1)):
                if time.monotonic() < deadline:
                    continue
                raise TransportTimeout(
                    f"no message from {self.peer} on {self.address} within {timeout_s}s "
                    f"({self.received} received; {self.tracker.summary()})")
            frames = self._sock.recv_multipart(copy=False)
            env = self._decode(frames)
            if env is None:
                continue
            eos = isinstance(env.body, Ack) and env.body.kind == "eos"
            if not self.tracker.accept(env.sender, env.epoch, env.seq, eos=eos) or eos:
                continue
            self.received += 1
            return env

    def try_recv(self) -> Envelope | None:
        """Non-blocking: a new message if one is queued now, else None."""
        try:
            return self.recv(timeout_s=0.001)
        except TransportTimeout:
            return None

    def _decode(self, frames) -> Envelope | None:
        size = sum(len(f.buffer) for f in frames)
        self.bytes += size
        try:
            if len(frames) != 1:
                raise ValueError(f"expected 1 frame, got {len(frames)}")
            return decode(frames[0].buffer)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            self.tracker.malformed += 1
            head = bytes(frames[0].buffer[:16])
            err = MalformedMessage(f"malformed message on {self.address} ({size} bytes, starts {head!r}): {e}")
            self.tracker.emit(StreamEvent("malformed", "?", 0, -1, -1, str(err)))
            if self.on_malformed == "raise":
                raise err from None
            return None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()
        path = ipc_path(self.endpoint)
        if path and os.path.exists(path):
            os.unlink(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
