"""engine/jit_warmup.py: the row counts it launches cover every launch class (brute force over all row counts),
the products it finds are the ones the engine's GEMM takes; on a GPU, after the engine's set-up, eager launches
(and the sampler's) at other row counts compile nothing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.decode_linear import decode_linear
from engine.jit_warmup import attention_row_counts, gemm_products, int_class, representatives
from engine.model import CausalLM, ModelArgs

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(model_type="qwen3", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
           tie_word_embeddings=True)


def covers(reps: list[int], classify, limit: int) -> None:
    """Every n in 1..limit shares its class with exactly one representative, the smallest n of that class."""
    by_class = {classify(r): r for r in reps}
    assert len(by_class) == len(reps)
    for n in range(1, limit + 1):
        assert classify(n) in by_class and by_class[classify(n)] <= n


def test_representatives_are_the_first_of_each_class():
    classify = lambda n: (n % 7 == 0, int_class(n))  # noqa: E731
    reps = representatives(classify, 120)
    covers(reps, classify, 120)
    assert reps == [1, 2, 7, 16, 112]  # (F, 1), (F, -), (T, -), (F, 16), (T, 16)
    assert [int_class(n) for n in (1, 2, 16, 32, 33)] == ["1", "-", "16", "16", "-"]


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_attention_row_counts_cover_every_launch_config(kv_heads):
    pytest.importorskip("triton")
    from engine.triton_attention import default_block_n, default_splits, default_stages

    dev = torch.device("cpu")  # the interpreter's split rule; on a GPU the SM count's (the GPU test below)
    classify = lambda r: (default_splits(r, kv_heads, dev), default_block_n(r, kv_heads),  # noqa: E731
                          default_stages(r, kv_heads))
    reps = attention_row_counts(2048, kv_heads, dev)
    covers(reps, classify, 2048)
    assert 1 < len(reps) < 20  # a handful of launches, not one per row count


def test_gemm_row_counts_cover_the_skinny_gemms_classes():
    pytest.importorskip("triton")
    from engine import triton_gemm
    from engine.jit_warmup import gemm_row_counts

    for n, k in ((151936, 1024), (6144, 1024), (1024, 2048)):  # LM head (wide), gate/up, o of the 0.6B shape
        def classify(m, n=n, k=k):
            return int_class(m), tuple(sorted(triton_gemm.config(m, n, k, 132).items()))
        reps = gemm_row_counts(n, k, 132)
        taken = [m for m in range(1, 257) if triton_gemm.takes(m, n)]
        assert set(reps) <= set(taken)
        covers(reps, classify, max(taken))
    head = gemm_row_counts(151936, 1024, 132)
    assert any(32 < m < 64 and m % 16 for m in head)  # the 64-row block at a row count no graph bucket has


@pytest.mark.parametrize("vocab", [300, 151936])
def test_sampler_row_counts_cover_the_split_classes(vocab):
    pytest.importorskip("triton")
    from engine.jit_warmup import sampler_row_counts
    from engine.triton_sampling import BLOCK, split

    reps = sampler_row_counts(vocab, 4096)
    covers(reps, lambda b: split(vocab, b, BLOCK), 4096)
    assert len(reps) <= 2 and reps[-1] <= 257  # two launch configs; the scratch logits stay small
    for b in range(1, 4096):  # every split tiles the row in whole race steps (4 blocks), the last chunk non-empty
        chunk, nchunk = split(vocab, b, BLOCK)
        assert chunk % (4 * BLOCK) == 0 and (nchunk - 1) * chunk < vocab <= nchunk * chunk


# In a process of its own: bench/triton_resources.py's stand-in sm_90 driver makes every launch compile and return,
# so Triton's real specialisation keys decide what compiles, with no GPU (CPU tensors: the attention's split rule
# is the interpreter's, the GEMM and the sampler's are the GPU's).
REAL_KEYS = """
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench"]
from triton_resources import compile_only
from engine import decode_linear, triton_gemm
from engine.jit_compiles import TritonCompiles
from engine.jit_warmup import compile_eager_kernels, gemm_products
from engine.model import CausalLM, ModelArgs
from engine.triton_attention import decode_attention
from engine.triton_sampling import inverse_cdf_sample

compile_only(90)
decode_linear._triton_capable = lambda x, w: True  # CPU tensors stand in for the GPU's
triton_gemm._sm_count = lambda index: 132  # an H200's
cfg = dict(model_type="qwen3", vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
torch.set_default_dtype(torch.bfloat16)
model = CausalLM(ModelArgs.from_hf_config(cfg)).eval().fuse_projections()
model.set_gemm(decode_linear.decode_linear)
kc = torch.zeros(512, 2, 16)
with TritonCompiles() as setup:
    launches = compile_eager_kernels(model, kc, kc, 600, attention=True, sample=True)
with TritonCompiles() as later:  # other row counts, the arguments laid out as the engine's
    for r in (3, 5, 13, 21, 37, 77, 130, 333, 600):
        q, kv = torch.zeros(r, 4, 16), torch.zeros(r, 2, 16)
        indptr, idx = torch.arange(r + 1, dtype=torch.int32), torch.zeros(r, dtype=torch.int32)
        decode_attention(q, kc, kc, indptr=indptr, indices=idx)
        decode_attention(q, kc, kc, indptr=indptr, indices=idx, new_kv=(kv, kv, torch.full_like(idx, -1)))
    for w, b, gated in gemm_products(model):
        for m in (3, 7, 16, 37, 50, 64):
            if triton_gemm.takes(m, w.shape[0]):
                triton_gemm.skinny_linear(torch.zeros(m, w.shape[1]), w, b, gated=gated)
    for b in [*range(1, 70), 96, 130, 255, 256, 257, 300, 333, 384, 511, 600]:  # rows of one [6, b] block
        f = torch.rand(6, b, dtype=torch.float32)
        inverse_cdf_sample(torch.zeros(b, 151936, dtype=torch.float32), f[0], f[4], f[5])
print(json.dumps(dict(launches=launches, setup=dict(setup.by_kernel), later=dict(later.by_kernel))))
"""


def test_after_the_warm_up_no_row_count_compiles_with_tritons_real_keys(tmp_path):
    """With Triton's real specialisation keys (compiled for sm_90, no GPU): after `compile_eager_kernels`, the
    CSR attention at 9 other row counts, the skinny GEMM's products at 6 and the sampler at 80 (1 to 600, the
    engine's argument layout) compile nothing; the sampler's set-up is its 2 launch configs x 2 kernels (session
    15's chunking and alignment-specialised pointers compiled 23 more over the same row counts)."""
    pytest.importorskip("triton")
    from engine import jit_compiles

    if jit_compiles.knobs is None:
        pytest.skip("needs Triton's runtime knobs (3.4+)")
    script = tmp_path / "keys.py"
    script.write_text(REAL_KEYS)
    run = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, timeout=900,
                         check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["later"] == {}, got
    assert got["setup"]["_chunk_kernel"] == got["setup"]["_cdf_pick_kernel"] == 2, got
    assert got["setup"]["_decode_kernel"] > 0 and got["setup"]["_skinny_kernel"] > 0, got


def test_gemm_products_are_the_distinct_products_the_engine_routes():
    m = CausalLM(ModelArgs.from_hf_config(CFG)).eval().fuse_projections()
    assert gemm_products(m) == []  # no engine GEMM set: nothing to compile
    m.set_gemm(decode_linear)
    got = {(tuple(w.shape), b is None, gated) for w, b, gated in gemm_products(m)}
    h, i, v, hd = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"], CFG["head_dim"]
    q, kv = CFG["num_attention_heads"] * hd, CFG["num_key_value_heads"] * hd
    assert got == {((q + 2 * kv, h), True, False), ((h, q), True, False), ((2 * i, h), True, True),
                   ((h, i), True, False), ((v, h), True, False)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_after_the_engines_set_up_eager_launches_compile_nothing(tmp_path):
    pytest.importorskip("triton")
    from engine import triton_gemm
    from engine.jit_compiles import TritonCompiles
    from engine.llm import LLM
    from engine.triton_attention import decode_attention
    from engine.triton_sampling import inverse_cdf_sample
    from npr_async.config import EngineConfig
    from npr_async.models import init_model

    path = init_model("tiny", str(tmp_path / "m"), seed=0)
    llm = LLM(path, config=EngineConfig(kv_slots=512, attention_backend="triton", max_batch_tokens=600),
              device="cuda", dtype=torch.bfloat16)
    llm.generate(["hi"], n=1)  # sets up: graph capture (off here) and the eager kernels' compilation
    a, kc, vc = llm.model.args, llm.kv.k[0], llm.kv.v[0]
    with TritonCompiles() as c:
        for r in (3, 5, 13, 21, 37, 77, 130, 333, 600):
            q = torch.randn(r, a.num_heads, a.head_dim, device="cuda", dtype=kc.dtype)
            kv = torch.randn(r, a.num_kv_heads, a.head_dim, device="cuda", dtype=kc.dtype)
            indptr = torch.arange(r + 1, dtype=torch.int32, device="cuda")
            idx = torch.randint(0, 512, (r,), dtype=torch.int32, device="cuda")
            decode_attention(q, kc, vc, indptr=indptr, indices=idx)
            decode_attention(q, kc, vc, indptr=indptr, indices=idx, new_kv=(kv, kv, torch.full_like(idx, -1)))
        for b in (3, 5, 13, 21, 57, 77, 130, 333, 600):  # the sampler's rows: views into its [6, b] parameters
            f = torch.rand(6, b, device="cuda")
            logits = torch.randn(b, a.vocab_size, device="cuda")
            inverse_cdf_sample(logits, f[0] + 0.5, f[4] - 0.5, f[5])
        for w, b, gated in gemm_products(llm.model):
            for m in (3, 7, 16, 37, 50, 64):
                if triton_gemm.takes(m, w.shape[0]):
                    triton_gemm.skinny_linear(torch.randn(m, w.shape[1], device="cuda", dtype=w.dtype), w, b,
                                              gated=gated)
    torch.cuda.synchronize()
    assert c.count == 0, dict(c.by_kernel)
