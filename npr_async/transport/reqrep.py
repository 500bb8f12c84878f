"""Request/reply over ROUTER (server, binds) / DEALER (clients, connect), for messages that need an answer
(e.g. a `RolloutRequest` acked by the generator). Same `Envelope` framing and timeouts as the channels;
a reply carries the request's `seq`, so a late reply to an earlier, timed-out request is recognised and
dropped instead of being taken for the answer to the current one.
"""
from __future__ import annotations

import os
import random
import time

import msgspec
import zmq

from npr_async.messages import Envelope, Message
from npr_async.transport.endpoints import connect_address, ipc_path
from npr_async.transport.streams import MalformedMessage, TransportTimeout
from npr_async.transport.zmq import decode, encode


class Replier:
    """ROUTER: `recv() -> (peer_id, Envelope)`, then `reply(peer_id, request, body)`."""

    def __init__(self, endpoint: str, *, name: str = "server", timeout_s: float = 300.0, hwm: int = 1024):
        self.name, self.timeout_s = name, timeout_s
        self.epoch = time.time_ns() ^ random.getrandbits(20)
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # replying to a vanished peer raises, never drops silently
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.address = connect_address(self.endpoint)

    def recv(self, timeout_s: float | None = None) -> tuple[bytes, Envelope]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not self._sock.poll(max(int(timeout_s * 1000), 1), zmq.POLLIN):
            raise TransportTimeout(f"{self.name}: no request on {self.address} within {timeout_s}s")
        frames = self._sock.recv_multipart()
        if len(frames) != 2:
            raise MalformedMessage(f"{self.name}: request on {self.address} has {len(frames)} frames, expected 2")
        try:
            return frames[0], decode(frames[1])
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise MalformedMessage(f"{self.name}: malformed request on {self.address} from peer "
                                   f"{frames[0]!r} ({len(frames[1])} bytes): {e}") from None

    def reply(self, peer: bytes, request: Envelope, body: Message) -> None:
        env = Envelope(self.name, self.epoch, request.seq, time.time_ns(), body)
        try:
            self._sock.send_multipart([peer, encode(env)])
        except zmq.ZMQError as e:
            raise TransportTimeout(f"{self.name}: cannot reply to {request.sender} ({e})") from None

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
        path = ipc_path(self.endpoint)
        if path and os.path.exists(path):
            os.unlink(path)


class Requester:
    """DEALER: `request(body) -> Envelope` (the reply), bounded by `timeout_s`."""

    def __init__(self, endpoint: str, *, name: str, peer: str = "server", timeout_s: float = 300.0):
        self.endpoint, self.name, self.peer, self.timeout_s = endpoint, name, peer, timeout_s
        self.epoch = time.time_ns() ^ random.getrandbits(20)
        self.seq = 0
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)

    def request(self, body: Message, timeout_s: float | None = None) -> Envelope:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        seq, self.seq = self.seq, self.seq + 1
        deadline = time.monotonic() + timeout_s
        if not self._sock.poll(max(int(timeout_s * 1000), 1), zmq.POLLOUT):
            raise TransportTimeout(f"{self.name}: cannot send request {seq} to {self.peer} at {self.endpoint}")
        self._sock.send(encode(Envelope(self.name, self.epoch, seq, time.time_ns(), body)))
        while (left := deadline - time.monotonic()) > 0:
            if not self._sock.poll(max(int(left * 1000), 1), zmq.POLLIN):
                break
            data = self._sock.recv()
            try:
                env = decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                raise MalformedMessage(f"{self.name}: malformed reply from {self.peer} at {self.endpoint}: {e}") from None
            if env.seq == seq:
                return env  # else: a late reply to an earlier request; drop it
        raise TransportTimeout(f"{self.name}: no reply from {self.peer} at {self.endpoint} to request {seq} "
                               f"within {timeout_s}s")

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
