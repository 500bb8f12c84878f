"""cuBLASLt products with the algorithm picked by timing, not by cuBLAS's heuristic (issue 8).

F.linear takes cuBLAS's first heuristic pick for a shape. For the decode step's products that cuBLAS runs (q/k/v,
o and down from 17 rows, everything at 256) the picks reach 52-66% of the copy bandwidth at 64 rows and 44-56% of
the bf16 peak at 256 (BENCHMARKS.md). cuBLASLt lists more algorithms than the one it picks: `candidates` asks its
heuristic for up to `count` of them and adds the split-K counts each one allows; `time_candidates` times every
candidate in a CUDA graph over distinct weights (HBM time, as the engine streams them) against F.linear; `tune`
keeps the winner for `choice` only where it beats F.linear; `linear` runs one. The library is torch's own libcublasLt (found among the
process's mappings), called through ctypes on torch's current stream, so the launches are CUDA-graph capturable.

Split-K candidates reduce in float32 (`REDUCTION_COMPUTE_TYPE`), as F.linear's fp32 accumulation does; every
candidate is checked against F.linear before it is timed. Not thread-safe across streams: one workspace per GPU.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WORKSPACE = 32 << 20  # bytes per GPU; torch's own cuBLASLt workspace default on Hopper is 32 MiB
_COMPUTE_32F, _R_32F = 68, 0  # cublasComputeType_t CUBLAS_COMPUTE_32F, cudaDataType CUDA_R_32F
_DTYPES = {torch.bfloat16: 14, torch.float16: 2}  # CUDA_R_16BF, CUDA_R_16F
_DESC_TRANSA, _DESC_TRANSB, _OP_N, _OP_T = 3, 4, 0, 1
_PREF_MAX_WORKSPACE, _PREF_REDUCTION_MASK = 1, 3
_CAP_SPLITK, _CFG_SPLITK, _CFG_REDUCTION = 0, 2, 3
REDUCTION_COMPUTE_TYPE = 2  # cublasLtReductionScheme_t: partials in float32 in the workspace, then reduced
SPLITS = (2, 3, 4, 6, 8, 12, 16)  # split-K counts tried on top of each algorithm's own
TUNE_BYTES = 512 << 20  # weight bytes streamed per timed replay: ten times the H200's 50-MB L2
_STATUS = {1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH", 13: "EXECUTION_FAILED",
           14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED"}


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]  # cublasLtMatmulAlgo_t: opaque, copyable

    def key(self) -> tuple:
        return tuple(self.data)


class _Heuristic(ctypes.Structure):  # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int), ("waves", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


class CublasLtError(RuntimeError):
    pass


def _check(status: int, what: str) -> None:
    if status:
        raise CublasLtError(f"{what}: cuBLASLt status {status} ({_STATUS.get(status, 'unknown')})")


@functools.cache
def _lib() -> ctypes.CDLL:
    """torch's libcublasLt: the one already mapped into the process once cuBLAS is initialised."""
    torch.cuda.current_blas_handle()  # loads libcublas and with it libcublasLt
    with open("/proc/self/maps") as f:
        paths = [line.split()[-1] for line in f if "libcublasLt.so" in line]
    path = paths[0] if paths else ctypes.util.find_library("cublasLt")
    if path is None:
        raise CublasLtError("libcublasLt is neither mapped into this process nor on the library path")
    lib = ctypes.CDLL(path)
    vp, u64, i64 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64
    lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.POINTER(vp), ctypes.c_int, u64, u64, i64]
    lib.cublasLtMatmul.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, ctypes.c_size_t, vp]
    lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int, vp,
                                                   ctypes.POINTER(ctypes.c_int)]
    lib.cublasLtMatmulAlgoCheck.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp]
    for name in ("cublasLtMatmulDescSetAttribute", "cublasLtMatmulPreferenceSetAttribute"):
        getattr(lib, name).argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
    lib.cublasLtMatmulAlgoConfigSetAttribute.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
    lib.cublasLtMatmulAlgoCapGetAttribute.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t, vp]
    return lib


@functools.cache
def _handle(device_index: int) -> ctypes.c_void_p:
    with torch.cuda.device(device_index):
        h = ctypes.c_void_p()
        _check(_lib().cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
    return h


@functools.cache
def _workspace(device_index: int) -> torch.Tensor:
    return torch.empty(WORKSPACE, dtype=torch.uint8, device=torch.device("cuda", device_index))


@functools.cache
def _desc(dtype: torch.dtype) -> ctypes.c_void_p:
    """y^T [N, M] = W [N, K] . x^T [K, M] in cuBLAS's column-major terms: A = W (transposed), B = x."""
    d, lib = ctypes.c_void_p(), _lib()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(d), _COMPUTE_32F, _R_32F), "cublasLtMatmulDescCreate")
    for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
        v = ctypes.c_int32(op)
        _check(lib.cublasLtMatmulDescSetAttribute(d, attr, ctypes.byref(v), 4), "cublasLtMatmulDescSetAttribute")
    return d


@functools.cache
def _layout(dtype: torch.dtype, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
    lay = ctypes.c_void_p()
    _check(_lib().cublasLtMatrixLayoutCreate(ctypes.byref(lay), _DTYPES[dtype], rows, cols, ld),
           "cublasLtMatrixLayoutCreate")
    return lay


@dataclass(frozen=True)
class Candidate:
    algo: Algo
    workspace: int
    label: str  # "h3" (the heuristic's 4th pick), "h3/s4" (the same with 4 K splits)


def _layouts(m: int, n: int, k: int, dtype: torch.dtype, ld_x: int, ld_w: int):
    return _layout(dtype, k, n, ld_w), _layout(dtype, k, m, ld_x), _layout(dtype, n, m, n)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A product `linear` can run: 2-D CUDA half-precision operands, unit inner strides, 256-byte aligned."""
    return (x.is_cuda and x.dim() == 2 and weight.dim() == 2 and x.dtype in _DTYPES and weight.dtype == x.dtype
            and x.stride(1) == 1 and weight.stride(1) == 1 and x.data_ptr() % 256 == 0
            and weight.data_ptr() % 256 == 0 and x.stride(0) % 8 == 0 and weight.stride(0) % 8 == 0)


def candidates(m: int, n: int, k: int, dtype: torch.dtype, device_index: int, count: int = 32,
               splits: tuple[int, ...] = SPLITS) -> list[Candidate]:
    """The heuristic's algorithms for [m, k] @ [n, k]^T (best guess first), then each split-K-capable one again
    at every count of `splits` that `cublasLtMatmulAlgoCheck` accepts within the workspace."""
    lib, h, desc = _lib(), _handle(device_index), _desc(dtype)
    la, lb, lc = _layouts(m, n, k, dtype, k, k)
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
    try:
        ws, mask = ctypes.c_uint64(WORKSPACE), ctypes.c_uint32(REDUCTION_COMPUTE_TYPE)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE, ctypes.byref(ws), 8), "pref")
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_REDUCTION_MASK, ctypes.byref(mask), 4), "pref")
        results, got = (_Heuristic * count)(), ctypes.c_int()
        _check(lib.cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, lc, lc, pref, count, results, ctypes.byref(got)),
               "cublasLtMatmulAlgoGetHeuristic")
    finally:
        lib.cublasLtMatmulPreferenceDestroy(pref)
    out, seen = [], set()
    for i, r in enumerate(results[:got.value]):
        if r.state == 0 and r.algo.key() not in seen:
            seen.add(r.algo.key())
            out.append(Candidate(r.algo, r.workspace, f"h{i}"))
    for base in list(out):
        cap, written = ctypes.c_int32(), ctypes.c_size_t()
        if lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(base.algo), _CAP_SPLITK, ctypes.byref(cap), 4,
                                                 ctypes.byref(written)) or not cap.value:
            continue
        for split in splits:
            algo = Algo.from_buffer_copy(base.algo)
            s, red = ctypes.c_uint32(split), ctypes.c_uint32(REDUCTION_COMPUTE_TYPE)
            if (lib.cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(algo), _CFG_SPLITK, ctypes.byref(s), 4)
                    or lib.cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(algo), _CFG_REDUCTION,
                                                                ctypes.byref(red), 4)):
                continue
            res = _Heuristic()
            if (lib.cublasLtMatmulAlgoCheck(h, desc, la, lb, lc, lc, ctypes.byref(algo), ctypes.byref(res))
                    or res.workspace > WORKSPACE or algo.key() in seen):
                continue
            seen.add(algo.key())
            out.append(Candidate(algo, res.workspace, f"{base.label}/s{split}"))
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, algo: Algo | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T through cuBLASLt with `algo` (None: its own heuristic's pick); `supports`
    must hold. Launched on torch's current stream."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"cublaslt.linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not share K")
    dev = x.device.index or 0
    out = x.new_empty(m, n)
    la, lb, lc = _layouts(m, n, k, x.dtype, x.stride(0), weight.stride(0))
    one, zero, ws = ctypes.c_float(1.0), ctypes.c_float(0.0), _workspace(dev)
    _check(_lib().cublasLtMatmul(_handle(dev), _desc(x.dtype), ctypes.byref(one), weight.data_ptr(), la,
                                 x.data_ptr(), lb, ctypes.byref(zero), out.data_ptr(), lc, out.data_ptr(), lc,
                                 None if algo is None else ctypes.byref(algo), ws.data_ptr(), WORKSPACE,
                                 torch.cuda.current_stream(x.device).cuda_stream), "cublasLtMatmul")
    return out


def graph_ms(fn, replays: int = 20) -> float:
    """Milliseconds per call of `fn` replayed from a CUDA graph (launch cost excluded, as in the engine)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up off the capture stream: heuristics, lazy allocations
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def time_candidates(x: torch.Tensor, weights: list[torch.Tensor], cands: list[Candidate],
                    rtol: float = 2e-2, replays: int = 5) -> tuple[float, list[tuple[Candidate, float]]]:
    """(F.linear's ms per product, [(candidate, ms per product)]) over `weights` (distinct, so together larger
    than L2), each in a CUDA graph; a candidate that fails or differs from F.linear by more than `rtol` of the
    output's scale is left out."""
    ref = F.linear(x, weights[0]).float()
    scale = ref.abs().max().item() or 1.0
    base = graph_ms(lambda: [F.linear(x, w) for w in weights], replays) / len(weights)
    timed = []
    for c in cands:
        try:
            if (linear(x, weights[0], c.algo).float() - ref).abs().max().item() > rtol * scale:
                continue
            timed.append((c, graph_ms(lambda a=c.algo: [linear(x, w, a) for w in weights], replays) / len(weights)))
        except (CublasLtError, RuntimeError):  # an algorithm the check let through but the launch refuses
            torch.cuda.synchronize()
    return base, timed


# (rows, N, K, x's and w's row strides, dtype, device) -> an algorithm measured faster than F.linear (`tune`)
_CHOICE: dict[tuple, Algo] = {}


def _key(x_shape, w: torch.Tensor, ld_x: int) -> tuple:
    """The layouts an algorithm was checked for: a weight of the same shape but another stride is not them."""
    return x_shape[0], w.shape[0], w.shape[1], ld_x, w.stride(0), w.dtype, w.device.index or 0


def choice(x: torch.Tensor, weight: torch.Tensor) -> Algo | None:
    """The tuned algorithm for this product, or None (not tuned, F.linear was fastest, or `supports` fails)."""
    if not _CHOICE or not supports(x, weight):
        return None
    return _CHOICE.get(_key(x.shape, weight, x.stride(0)))


def clear() -> None:
    """Forget every tuned choice: F.linear everywhere again."""
    _CHOICE.clear()


def tune(m: int, weights: list[torch.Tensor], count: int = 8, splits: tuple[int, ...] = (),
         margin: float = 0.02) -> dict:
    """Time [m, K] @ w^T for every candidate over `weights` (same shape and strides, distinct; together larger
    than L2) and
    keep the fastest for `choice` if it beats F.linear by more than `margin`. Returns what was measured. The
    defaults are what won on an H200 (BENCHMARKS.md): one of the heuristic's first 8, never an added split-K."""
    w0 = weights[0]
    n, k = w0.shape
    dev = w0.device.index or 0
    x = torch.randn(m, k, device=w0.device, dtype=w0.dtype)
    cands = candidates(m, n, k, w0.dtype, dev, count, splits)
    base, timed = time_candidates(x, weights, cands)
    report = {"rows": m, "N": n, "K": k, "f_linear_us": base * 1e3, "candidates": len(cands), "timed": len(timed),
              "choice": None}
    if timed:
        best, ms = min(timed, key=lambda t: t[1])
        report.update(best=best.label, best_us=ms * 1e3, first_us=timed[0][1] * 1e3)
        if ms < base * (1 - margin):
            _CHOICE[_key(x.shape, w0, k)] = best.algo
            report["choice"] = best.label
    return report
