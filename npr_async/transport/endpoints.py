"""ZeroMQ endpoints: where a receiver binds and the address its senders connect to.

`ipc://` on one host (a socket file in a short private temp dir: the path limit is ~107 bytes), `tcp://`
across hosts (bind port 0, then hand out the address the OS picked with this host's routable IP).
"""
from __future__ import annotations

import os
import socket
import tempfile
import uuid

_RUNTIME_DIR: str | None = None


def runtime_dir() -> str:
    """A private directory for this process's ipc sockets (short path under /tmp)."""
    global _RUNTIME_DIR
    if _RUNTIME_DIR is None or not os.path.isdir(_RUNTIME_DIR):
        base = "/tmp" if os.path.isdir("/tmp") else None
        _RUNTIME_DIR = tempfile.mkdtemp(prefix="npr-zmq-", dir=base)
    return _RUNTIME_DIR


def host_ip() -> str:
    """This host's address as other hosts see it (the interface of the default route), else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: UDP connect only picks the route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def make_endpoint(scheme_or_cfg, name: str, host: str | None = None) -> str:
    """A bind endpoint for a channel called `name`. `scheme_or_cfg`: "ipc", "tcp" or a TransportConfig
    (its `zmq_scheme`). For tcp, `host` is the interface to bind (default: all); the port is picked at bind."""
    scheme = scheme_or_cfg if isinstance(scheme_or_cfg, str) else scheme_or_cfg.zmq_scheme
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:32] or "chan"
    if scheme == "ipc":
        return f"ipc://{runtime_dir()}/{safe}-{uuid.uuid4().hex[:8]}.sock"
    if scheme == "tcp":
        return f"tcp://{host or '0.0.0.0'}:0"
    raise ValueError(f"unknown zmq scheme {scheme!r} (expected ipc or tcp)")


def connect_address(bound: str) -> str:
    """The address peers connect to, from a socket's LAST_ENDPOINT (a wildcard host becomes this host's IP)."""
    if bound.startswith("tcp://"):
        hostport = bound[len("tcp://"):]
        host, port = hostport.rsplit(":", 1)
        if host in ("0.0.0.0", "*", "[::]", "::"):
            host = host_ip()
        return f"tcp://{host}:{port}"
    return bound


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None
