"""Registers, spills, shared memory and async copies of the engine's Triton kernels, compiled for an H100/H200
(sm_90) on a machine without a GPU.

    python3 bench/triton_resources.py --rows 1,16,64,256

Each decode-step kernel is compiled through the engine's own launch wrapper (decode_attention, skinny_linear,
qk_norm_rope, rms_norm, the sampler) on small CPU tensors of the Qwen3-4B shape, so it gets the same constexprs and the
same argument specialisation (16-byte alignment, which lets loads vectorise and go asynchronous) as on the GPU;
a stand-in driver answers "sm_90" and every launch stops after the compile. Resources come from the wheel's
`cuobjdump --dump-resource-usage`, load widths and barriers from the PTX. Compile errors, register pressure and
unvectorised loads show here; timings do not, and this machine's Triton may not be the GPU machine's (compare
`triton.__version__`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class CompileOnlyDriver:
    """What JITFunction.run asks of the active driver before it compiles, answered for an sm_90 device."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_only(capability: int) -> list:
    """From now on every `kernel[grid](...)` compiles (warmup) and returns without launching; the compiled
    kernels are appended to the returned list as (name, CompiledKernel)."""
    driver.set_active(CompileOnlyDriver(capability))
    seen = []
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        seen.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_instead
    return seen


def resources(kernel) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{usage.stdout}{usage.stderr}")
    ptx = kernel.asm["ptx"]
    loads = re.findall(r"ld\.global(?:\.[a-z]+)*\.(v[248]\.)?[bfsu](\d+)", ptx)
    return dict(registers=int(found.group(1)), stack_bytes=int(found.group(2)), shared_bytes=kernel.metadata.shared,
                warps=kernel.metadata.num_warps, stages=kernel.metadata.num_stages,
                async_copies=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                # global loads of 16-bit scalars: a bf16 tensor read element by element (no vectorisation), as
                # session 8's RoPE partner read `(d + D/2) % D` compiled (2.5x the q/k kernel's time)
                vector_loads=sum(1 for vec, _ in loads if vec),
                scalar_16bit_loads=sum(1 for vec, bits in loads if not vec and bits == "16"),
                barriers=ptx.count("bar.sync"))


def decode_step_kernels(rows: int, ctx: int, hidden: int = 2560, inter: int = 9728, vocab: int = 151936) -> list:
    """Launch each Triton kernel of a Qwen3-4B decode step at `rows` rows once, on zero CPU tensors: (what, call)."""
    from engine import triton_gemm
    from engine.triton_attention import decode_attention
    from engine.triton_norm import add_rms_norm, rms_norm
    from engine.triton_qk_rope import qk_norm_rope_cuda
    from engine.triton_sampling import inverse_cdf_sample

    triton_gemm._sm_count = lambda index: 132  # an H200's SMs: the split rule's input
    hq, hkv, d, bf16 = 32, 8, 128, torch.bfloat16
    z = lambda *shape, dtype=bf16: torch.zeros(*shape, dtype=dtype)  # noqa: E731
    qk = z(rows, hq + hkv, d)
    cos = z(rows, 1, d)
    norms = (z(d), z(d), 1e-6, cos.view(rows, d), cos.view(rows, d))
    slots = torch.arange(rows, dtype=torch.int32)
    attn_args = dict(table=torch.zeros(rows, ctx, dtype=torch.int32), lens=torch.full((rows,), ctx, dtype=torch.int32),
                     new_kv=(z(rows, hkv, d), z(rows, hkv, d), slots))
    kc = z(rows * ctx + rows, hkv, d)
    calls = [("attention", lambda: decode_attention(qk[:, :hq], kc, kc, **attn_args)),
             ("attention + q/k norm, RoPE", lambda: decode_attention(qk[:, :hq], kc, kc, qk_norm_rope=norms,
                                                                     **attn_args)),
             ("q/k norm + RoPE", lambda: qk_norm_rope_cuda(qk, z(d), z(d), hq, 1e-6, cos, cos)),
             ("RMSNorm (steps not compiled)", lambda: rms_norm(z(rows, hidden), z(hidden), 1e-6)),
             ("residual add + RMSNorm", lambda: add_rms_norm(z(rows, hidden), z(rows, hidden), z(hidden), 1e-6))]
    x, xi = z(rows, hidden), z(rows, inter)
    products = [("q/k/v", x, z((hq + 2 * hkv) * d, hidden), False), ("o", z(rows, hq * d), z(hidden, hq * d), False),
                ("gate/up + SwiGLU", x, z(2 * inter, hidden), True), ("down", xi, z(hidden, inter), False),
                ("LM head", x, z(vocab, hidden), False)]
    for name, xx, w, gated in products:  # those the engine gives this kernel at this batch (the rest: cuBLAS)
        if triton_gemm.takes(rows, w.shape[0]):
            calls.append((f"GEMM {name}", lambda xx=xx, w=w, gated=gated: triton_gemm.skinny_linear(xx, w, gated=gated)))
    logits = z(rows, vocab, dtype=torch.float32)
    calls.append(("sampler (inverse CDF)", lambda: inverse_cdf_sample(
        logits, torch.ones(rows), torch.ones(rows, dtype=torch.bool), torch.full((rows,), 0.5))))
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,16,64,256")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--capability", type=int, default=90, help="compute capability to compile for (90: H100/H200)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    seen = compile_only(a.capability)
    out = {"triton": triton.__version__, "capability": a.capability, "ctx": a.ctx, "kernels": []}
    print(f"Triton {triton.__version__}, sm_{a.capability}, context {a.ctx}")
    for rows in (int(r) for r in a.rows.split(",")):
        for what, call in decode_step_kernels(rows, a.ctx):
            first = len(seen)
            call()
            for name, kernel in seen[first:]:
                r = dict(rows=rows, what=what, kernel=name, **resources(kernel))
                out["kernels"].append(r)
                print(f"rows {rows:4d}  {what:28s} {name:22s} regs {r['registers']:3d}  spill stack {r['stack_bytes']:5d} B"
                      f"  smem {r['shared_bytes']:6d} B  warps {r['warps']}  stages {r['stages']}"
                      f"  cp.async {r['async_copies']}  loads vec {r['vector_loads']} / 16-bit {r['scalar_16bit_loads']}"
                      f"  barriers {r['barriers']}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
