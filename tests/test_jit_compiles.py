"""TritonCompiles: counts Triton's JIT compilations in a block, chains to earlier hooks, puts them back.

The bookkeeping runs everywhere (the hooks called as Triton calls them); the GPU test checks that a real
kernel launch with a new specialisation is counted once and a repeat is not."""
import time

import pytest
import torch

from engine import jit_compiles
from engine.jit_compiles import TritonCompiles


class _Fn:
    name = "_skinny_kernel"


def test_counts_time_and_kernels_as_triton_calls_the_hooks():
    c = TritonCompiles()
    for _ in range(2):
        assert c.before(key="k", repr="_skinny_kernel(M: i32)", fn=_Fn()) is None  # None: Triton compiles
        time.sleep(0.01)
        c.after(key="k", repr="_skinny_kernel(M: i32)", fn=_Fn())
    assert c.count == 2 and c.by_kernel == {"_skinny_kernel": 2}
    assert 20 <= c.ms < 1000
    assert c.signatures == ["_skinny_kernel(M: i32)"] * 2


@pytest.mark.skipif(jit_compiles.knobs is None, reason="needs Triton's runtime knobs")
def test_chains_to_and_restores_the_hooks_installed_before():
    rt = jit_compiles.knobs.runtime
    seen = []
    prev = (rt.jit_cache_hook, rt.jit_post_compile_hook)
    rt.jit_cache_hook = lambda **kw: seen.append("before") or True  # True: this earlier hook skips the compile
    rt.jit_post_compile_hook = lambda **kw: seen.append("after")
    mine = (rt.jit_cache_hook, rt.jit_post_compile_hook)
    try:
        with pytest.raises(RuntimeError), TritonCompiles() as c:
            assert c.before(fn=_Fn()) is True  # the earlier hook's answer goes back to Triton
            c.after(fn=_Fn())
            raise RuntimeError("the block fails")
        assert seen == ["before", "after"] and c.count == 1
        assert (rt.jit_cache_hook, rt.jit_post_compile_hook) == mine
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = prev


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_new_specialisation_compiles_once_on_the_gpu():
    from engine.triton_gemm import skinny_linear

    w = torch.randn(96, 80, device="cuda", dtype=torch.bfloat16)  # a shape no other test uses: fresh kernels
    with TritonCompiles() as first:
        skinny_linear(torch.randn(3, 80, device="cuda", dtype=torch.bfloat16), w)
    with TritonCompiles() as same:  # another row count of the same properties (not 1, not a multiple of 16)
        skinny_linear(torch.randn(5, 80, device="cuda", dtype=torch.bfloat16), w)
    with TritonCompiles() as new:  # 32 rows: divisible by 16 and a larger row block
        skinny_linear(torch.randn(32, 80, device="cuda", dtype=torch.bfloat16), w)
    torch.cuda.synchronize()
    assert first.count == 1 and first.by_kernel == {"_skinny_kernel": 1}
    assert same.count == 0
    assert new.count == 1 and new.ms > 0
