"""Flat weight buckets: the layout both sides of a weight sync agree on, and packing into / out of it.

Tensors are grouped by dtype (one dtype per bucket, so a bucket slice is a view of that dtype) and packed
in order into buckets of at most `bucket_bytes` (a larger tensor gets a bucket of its own), at 256-byte
aligned offsets. Buffers are raw uint8: the broadcast moves bytes and never needs a dtype of its own.

Stdlib + torch only (no msgspec): the NCCL path runs on GPU machines that may have nothing else. The JSON
it writes decodes as `npr_async.messages.WeightsMeta`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Mapping

import torch

ALIGN = 256


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def cast_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `t` is sent as: `dtype` for floating-point tensors when given (fp32 masters → bf16)."""
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def signature(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> tuple:
    """Names, shapes and sent dtypes, in order: equal signatures plan equal layouts (cheap: ~0.1 ms for
    400 tensors, against ~1 ms to plan and serialise a layout)."""
    return tuple((n, t.shape, cast_dtype(t, dtype)) for n, t in tensors.items())


def named_tensors(obj) -> dict[str, torch.Tensor]:
    """A module (its parameters), a mapping, or an iterable of (name, tensor) pairs, as an ordered dict."""
    if isinstance(obj, torch.nn.Module):
        return dict(obj.named_parameters())
    if isinstance(obj, Mapping):
        return dict(obj)
    return dict(obj)


@dataclass(frozen=True)
class Bucket:
    index: int
    dtype: str
    nbytes: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # bytes

    def views(self, buf: torch.Tensor):
        """(name, tensor view into the uint8 buffer `buf`) for every tensor of this bucket."""
        dt = torch_dtype(self.dtype)
        size = torch.empty((), dtype=dt).element_size()
        for name, shape, off in zip(self.names, self.shapes, self.offsets):
            n = 1
            for d in shape:
                n *= d
            yield name, buf[off:off + n * size].view(dt).view(shape)


@dataclass
class Layout:
    version: int
    round: int
    bucket_bytes: int
    buckets: list[Bucket] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def max_bucket_nbytes(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)

    def specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {n: (s, b.dtype) for b in self.buckets for n, s in zip(b.names, b.shapes)}

    def key(self) -> str:
        """Names the layout whatever the version and round: what later rounds carry instead of the JSON."""
        body = self.to_json(version=0, round=0)
        return hashlib.blake2b(body, digest_size=12).hexdigest()

    def to_json(self, version: int | None = None, round: int | None = None) -> bytes:
        return json.dumps({
            "version": self.version if version is None else version,
            "round": self.round if round is None else round, "bucket_bytes": self.bucket_bytes,
            "buckets": [{"index": b.index, "dtype": b.dtype, "nbytes": b.nbytes, "names": list(b.names),
                         "shapes": [list(s) for s in b.shapes], "offsets": list(b.offsets)}
                        for b in self.buckets]}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Layout":
        d = json.loads(data)
        return cls(d["version"], d["round"], d["bucket_bytes"], [
            Bucket(b["index"], b["dtype"], b["nbytes"], tuple(b["names"]), tuple(tuple(s) for s in b["shapes"]),
                   tuple(b["offsets"])) for b in d["buckets"]])


def plan(tensors: Mapping[str, torch.Tensor], bucket_bytes: int, version: int = 0, round: int = 0,
         dtype: torch.dtype | None = None) -> Layout:
    """Group by sent dtype (first-seen order), then fill buckets of <= bucket_bytes in the given order.
    `dtype`: send floating-point tensors as this dtype (packing casts them)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault(cast_dtype(t, dtype), []).append((name, t))
    buckets: list[Bucket] = []
    for dt, items in by_dtype.items():
        cur: list[tuple[str, tuple[int, ...], int]] = []
        end = 0
        for name, t in items:
            nb = t.numel() * _itemsize(dt)
            start = -(-end // ALIGN) * ALIGN
            if cur and start + nb > bucket_bytes:
                buckets.append(_bucket(len(buckets), dt, cur, end))
                cur, start = [], 0
            cur.append((name, tuple(t.shape), start))
            end = start + nb
        if cur:
            buckets.append(_bucket(len(buckets), dt, cur, end))
    return Layout(version, round, int(bucket_bytes), buckets)


def _itemsize(dt: torch.dtype) -> int:
    return dt.itemsize if hasattr(dt, "itemsize") else torch.empty((), dtype=dt).element_size()


def _bucket(index, dt, items, end) -> Bucket:
    return Bucket(index, dtype_name(dt), end, tuple(n for n, _, _ in items), tuple(s for _, s, _ in items),
                  tuple(o for _, _, o in items))


def mismatches(layout: Layout, params: Mapping[str, torch.Tensor], limit: int = 5) -> list[str]:
    """How `params` differ from the layout the sender announced (empty: they match)."""
    specs = layout.specs()
    out = [f"{n}: sent by rank 0 but not in this model" for n in specs if n not in params]
    out += [f"{n}: in this model but not sent by rank 0" for n in params if n not in specs]
    for n, (shape, dt) in specs.items():
        p = params.get(n)
        if p is None:
            continue
        if tuple(p.shape) != shape:
            out.append(f"{n}: shape {list(shape)} sent, this model has {list(p.shape)}")
        elif dtype_name(p.dtype) != dt:
            out.append(f"{n}: dtype {dt} sent, this model has {dtype_name(p.dtype)}")
    return out[:limit] + ([f"… and {len(out) - limit} more"] if len(out) > limit else [])


@torch.no_grad()
def pack(bucket: Bucket, params: Mapping[str, torch.Tensor], buf: torch.Tensor) -> None:
    for name, view in bucket.views(buf):
        view.copy_(params[name])


@torch.no_grad()
def unpack(bucket: Bucket, buf: torch.Tensor, into: Mapping[str, torch.Tensor]) -> None:
    for name, view in bucket.views(buf):
        into[name].copy_(view)


def direct_view(bucket: Bucket, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """A uint8 tensor over the tensors' own bytes when they already sit in the bucket's layout, so the
    broadcast reads (sender) or lands in (receiver) them with no copy; else None. That is the case for a
    lone-tensor bucket, for a storage made by `adopt`, and for tensors laid out back to back in one storage
    (fused q/k/v rows): the view never covers a byte that is not one of the bucket's tensors, except the
    alignment padding of a storage that is exactly the bucket (adopt's)."""
    first = tensors[bucket.names[0]]
    storage = first.untyped_storage()
    sbase, base = storage.data_ptr(), first.data_ptr()
    if base - sbase + bucket.nbytes > storage.nbytes():
        return None
    exclusive = base == sbase and storage.nbytes() == bucket.nbytes
    dt = torch_dtype(bucket.dtype)
    end = 0
    for name, shape, off in zip(bucket.names, bucket.shapes, bucket.offsets):
        t = tensors[name]
        if (t.dtype != dt or t.shape != shape or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != sbase or t.data_ptr() - base != off
                or (off != end and not exclusive)):
            return None
        end = off + t.numel() * t.element_size()
    if end != bucket.nbytes:
        return None
    return torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage, base - sbase, (bucket.nbytes,), (1,))


@torch.no_grad()
def adopt(layout: Layout, into: Mapping[str, torch.Tensor]) -> None:
    """Re-home each tensor (in place, same Python object) into one flat storage per bucket, laid out as
    the sender packs it: later receives then need no copy-out (on the sender: no packing, when it sends
    these same tensors in the layout's dtype). Do it before capturing CUDA graphs."""
    wrong = [f"{n}: {dtype_name(into[n].dtype)} {list(into[n].shape)}, the layout has {dt} {list(shape)}"
             for n, (shape, dt) in layout.specs().items()
             if n in into and (dtype_name(into[n].dtype) != dt or tuple(into[n].shape) != shape)]
    missing = [n for n in layout.specs() if n not in into]
    if wrong or missing:
        raise ValueError("adopt: these tensors cannot take the layout's storage: "
                         + "; ".join(wrong[:5] + [f"{n}: missing" for n in missing[:5]]))
    for b in layout.buckets:
        device = into[b.names[0]].device
        flat = torch.zeros(b.nbytes, dtype=torch.uint8, device=device)
        for name, view in b.views(flat):
            t = into[name]
            view.copy_(t)
            t.set_(flat.untyped_storage(), view.storage_offset(), view.shape, view.stride())

