"""Transport: trajectories over ZeroMQ (`zmq.py`, `reqrep.py`), weights over NCCL/gloo (`weights.py`).

Names are imported lazily (PEP 562), so `import npr_async.transport.weights` pulls in neither pyzmq nor
msgspec: the NCCL weight path runs on GPU machines that have only torch and CuPy. See docs/transport.md.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TrajectorySender": "zmq", "TrajectoryReceiver": "zmq", "encode": "zmq", "decode": "zmq",
    "Requester": "reqrep", "Replier": "reqrep",
    "make_endpoint": "endpoints", "connect_address": "endpoints",
    "TransportError": "streams", "TransportTimeout": "streams", "MalformedMessage": "streams",
    "StreamEvent": "streams",
    "WeightSender": "weights", "WeightReceiver": "weights",
    "WeightSyncError": "control", "WeightSyncTimeout": "control", "WeightMismatch": "control",
    "Layout": "buckets", "plan_buckets": "buckets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    obj = getattr(importlib.import_module(f"{__name__}.{mod}"), "plan" if name == "plan_buckets" else name)
    globals()[name] = obj
    return obj
