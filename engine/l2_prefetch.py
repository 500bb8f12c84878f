"""Pull a layer's next weights into L2 while the decode step's attention runs (a side stream in the graph).

A decode GEMM of few rows is a stream over its weights, and a short one pays a fixed ramp-up: on an H200 the
64-row o projection (21 MB) took 9.5 us where the copy bandwidth allows 4.9 (BENCHMARKS.md). Attention, just
before it, leaves HBM partly idle (64 rows: 2.8 of 4.3 TB/s). So when the step launches a layer's attention
it first forks a side stream that issues `prefetch.global.L2::evict_last` for the o projection's weights;
the GEMM then finds them in L2. Nothing waits on the prefetch (it changes no value, only where bytes are);
the step joins the side stream at its end, as CUDA-graph capture requires (`join`).
`BUDGET` (bytes per attention launch; 0: off) is read when a step is launched or captured, so a benchmark can
capture graphs with several budgets: the o projection first, then the MLP's first weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BUDGET = 24 << 20
LINE = 128  # bytes per L2 line
_STREAMS: dict[int, torch.cuda.Stream] = {}
_SINK: dict[int, torch.Tensor] = {}
_PENDING: set[int] = set()  # devices whose side stream has work the current stream has not joined


@triton.jit
def _prefetch_kernel(ptr, sink_ptr, n_bytes, BLOCK: tl.constexpr, LINE_BYTES: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK * LINE_BYTES
    offs = tl.arange(0, BLOCK) * LINE_BYTES
    done = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * BLOCK * LINE_BYTES, n_bytes, step):
        at = tl.minimum(start + offs, n_bytes - 1)  # the tail re-prefetches the last line: harmless
        done += tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                          [ptr + at], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(sink_ptr + pid, tl.sum(done, 0))  # a use of the results: the prefetches cannot be dropped


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _side(device: torch.device) -> tuple[torch.cuda.Stream, torch.Tensor]:
    idx = _index(device)
    if idx not in _STREAMS:
        _STREAMS[idx] = torch.cuda.Stream(device=idx)
        _SINK[idx] = torch.zeros(1024, dtype=torch.int32, device=device)
    return _STREAMS[idx], _SINK[idx]


def prefetch(tensors: list[torch.Tensor], budget: int | None = None, programs: int = 16, block: int = 256) -> None:
    """Start pulling the tensors' bytes into L2 on the side stream, in order, up to `budget` bytes in all
    (default `BUDGET`; the last one may be cut), after the work queued so far on the current stream; returns
    at once. Call `join` before anything that must see the side stream's work done."""
    left = BUDGET if budget is None else budget
    tensors = [t for t in tensors if t.is_cuda and t.numel()]
    if left <= 0 or not tensors:
        return
    for t in tensors:
        if not t.is_contiguous() or t.numel() * t.element_size() >= 2**31:
            raise ValueError(f"l2_prefetch: contiguous tensors under 2 GiB are expected, got {tuple(t.shape)} "
                             f"strides {t.stride()}")
    side, sink = _side(tensors[0].device)
    side.wait_stream(torch.cuda.current_stream(tensors[0].device))
    _PENDING.add(_index(tensors[0].device))
    with torch.cuda.stream(side):
        for t in tensors:
            flat = t.view(-1).view(torch.uint8)[:left]
            _prefetch_kernel[(min(programs, sink.numel()),)](flat, sink, flat.numel(), BLOCK=block,
                                                             LINE_BYTES=LINE, num_warps=4)
            left -= flat.numel()
            if left <= 0:
                break


def join(device: torch.device) -> None:
    """The current stream waits for the prefetches issued on `device` since the last join (a no-op when none
    was: a CUDA-graph capture may only wait on work captured with it)."""
    if device.type == "cuda" and _index(device) in _PENDING:
        _PENDING.discard(_index(device))
        torch.cuda.current_stream(device).wait_stream(_STREAMS[_index(device)])
