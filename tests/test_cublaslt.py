"""engine/cublaslt.py, cuBLASLt products with timed algorithm choice: every candidate against a float32 F.linear
(GPU: bf16 and fp16, row counts of decode buckets, split-K variants, strided x, inside a CUDA graph), tuning over
distinct weights and the engine's routing through it (decode_linear, the model's products); on the CPU, what
stays on F.linear and the errors of bad input."""
import pytest
import torch
import torch.nn.functional as F

from engine import cublaslt
from engine.decode_linear import decode_linear, decode_swiglu, tune_decode_gemms
from engine.model import CausalLM, ModelArgs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CFG = dict(model_type="qwen3", vocab_size=640, hidden_size=256, intermediate_size=384, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
           tie_word_embeddings=True)


def close(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-2) -> bool:
    return (y.float() - ref).abs().max().item() <= rtol * ref.abs().max().item()


def test_cpu_products_stay_on_f_linear():
    cublaslt.clear()  # an earlier GPU test's LLM may have tuned its own shapes
    x, w = torch.randn(8, 64), torch.randn(32, 64)
    assert not cublaslt.supports(x, w)
    assert cublaslt.choice(x, w) is None
    torch.testing.assert_close(decode_linear(x, w), F.linear(x, w))
    torch.manual_seed(0)
    model = CausalLM(ModelArgs.from_hf_config(CFG)).eval().fuse_projections()
    assert tune_decode_gemms(model, [64, 256]) == []  # float32 CPU weights: nothing to tune, nothing chosen
    assert not cublaslt._CHOICE


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(64, 768, 256), (17, 1024, 512), (256, 512, 1536)])
def test_every_candidate_matches_float32(m, n, k, dtype):
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
    ref = F.linear(x.float(), w.float())
    cands = cublaslt.candidates(m, n, k, dtype, 0)
    assert cands and cands[0].label == "h0"
    assert close(cublaslt.linear(x, w), ref)  # cuBLASLt's own pick (algo None)
    ran = 0
    for c in cands:
        try:
            y = cublaslt.linear(x, w, c.algo)
        except cublaslt.CublasLtError:
            continue
        ran += 1
        assert close(y, ref), c.label
    assert ran >= 1


@cuda
def test_strided_x_and_graph_replay_match_eager():
    torch.manual_seed(1)
    a = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    x = a[:, :512]  # the o projection's input in bench/gemm.py's chain: a row stride of 1024
    w = torch.randn(768, 512, device="cuda", dtype=torch.bfloat16) / 512 ** 0.5
    assert cublaslt.supports(x, w)
    algo = cublaslt.candidates(64, 768, 512, torch.bfloat16, 0)[0].algo
    eager = cublaslt.linear(x, w, algo)
    assert close(eager, F.linear(x.float(), w.float()))
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cublaslt.linear(x, w, algo)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = cublaslt.linear(x, w, algo)
    a.copy_(torch.randn_like(a))  # new inputs: the replay reads them, not the captured values
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, cublaslt.linear(x, w, algo), rtol=0, atol=0)


@cuda
def test_mismatched_k_is_a_clear_error():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not share K"):
        cublaslt.linear(x, torch.randn(32, 128, device="cuda", dtype=torch.bfloat16))


@cuda
def test_tune_records_only_a_faster_algorithm_and_decode_linear_runs_it():
    torch.manual_seed(2)
    ws = [torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
    try:
        r = cublaslt.tune(128, ws, margin=-1.0)  # margin -1: keep the fastest even if F.linear is faster
        assert r["timed"] >= 1 and r["choice"] == r["best"]
        x = torch.randn(128, 1024, device="cuda", dtype=torch.bfloat16)
        assert cublaslt.choice(x, ws[3]) is not None
        assert cublaslt.choice(x[:64], ws[3]) is None  # another row count: not tuned
        wide = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)[:, :1024]
        assert cublaslt.choice(x, wide) is None  # the same shape in another layout: not what was checked
        torch.testing.assert_close(decode_linear(x, ws[3]), cublaslt.linear(x, ws[3], cublaslt.choice(x, ws[3])),
                                   rtol=0, atol=0)
        assert close(decode_linear(x, ws[3]), F.linear(x.float(), ws[3].float()))
        r = cublaslt.tune(128, ws, margin=1.0)  # nothing is twice as fast as itself: F.linear stays
        assert r["choice"] is None
    finally:
        cublaslt.clear()
    assert cublaslt.choice(x, ws[3]) is None


@cuda
@torch.no_grad()
def test_tuned_model_matches_f_linear_model():
    torch.manual_seed(3)
    model = CausalLM(ModelArgs.from_hf_config(CFG)).to("cuda", torch.bfloat16).eval().fuse_projections()
    h = torch.randn(256, CFG["hidden_size"], device="cuda", dtype=torch.bfloat16)
    gu = model.model.layers[0].mlp.gate_up_proj.weight
    ref = decode_swiglu(h, gu)
    try:
        reports = tune_decode_gemms(model, [256])
        shapes = {(r["N"], r["K"]) for r in reports}
        # q/k/v, o, gate/up, down and the tied head: every product is left to cuBLAS at 256 rows
        assert (CFG["vocab_size"], CFG["hidden_size"]) in shapes and tuple(gu.shape) in shapes and len(shapes) == 5
        assert close(decode_swiglu(h, gu), ref.float())
    finally:
        cublaslt.clear()
