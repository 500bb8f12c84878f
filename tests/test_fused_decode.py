"""engine/fused_decode.py (experiment): the decode forward with residual adds and RMSNorms inside the GEMMs.
On the CPU its ops are the model's torch code, so the forward equals the model's bit for bit (Qwen3, Qwen2 with
biases, Llama); on the GPU the kernels' prologues and epilogues (and the cuBLAS fallback rows) against the
unfused decode step."""
import pytest
import torch

from engine import fused_decode
from engine.attention import CausalAttention
from engine.decode_linear import decode_linear
from engine.model import CausalLM, ModelArgs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(model_type, dtype=torch.float32, hidden=64, inter=96, device="cpu"):
    cfg = dict(model_type=model_type, vocab_size=300, hidden_size=hidden, intermediate_size=inter,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
               max_position_embeddings=256, tie_word_embeddings=model_type != "llama", attention_bias=True)
    torch.manual_seed(0)
    m = CausalLM(ModelArgs.from_hf_config(cfg)).to(device, dtype).eval()
    for p in m.parameters():  # norm weights off 1 and biases on, so a skipped norm or bias would show
        p.data.add_(0.1 * torch.randn_like(p))
    return m.fuse_projections().set_gemm(decode_linear)


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_forward_equals_the_model_on_cpu(model_type, dtype, monkeypatch):
    monkeypatch.setattr(fused_decode, "ENABLED", True)
    m = tiny(model_type, dtype)
    assert fused_decode.applies(m)
    ids = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9)
    want = m.head_logits(m(ids, pos, CausalAttention()))
    assert torch.equal(fused_decode.forward(m, ids, pos, CausalAttention()), want)


def test_ops_fake_kernels_and_when_it_applies(monkeypatch):
    x, w, b, res, g = torch.randn(3, 16), torch.randn(32, 16), torch.randn(32), torch.randn(3, 32), torch.rand(32)
    torch.library.opcheck(torch.ops.npr.residual_linear.default, (x, w, b, res, g, 1e-6, 64))
    new, h, ssq = fused_decode.residual_linear(x, w, b, res, g, 1e-6, 64)
    torch.testing.assert_close(ssq.sum(-1), (new ** 2).sum(-1))
    torch.library.opcheck(torch.ops.npr.norm_linear.default, (new, h, ssq, g, 1e-6, torch.randn(8, 32), None, True))
    m = tiny("qwen3")
    assert not fused_decode.applies(m)  # off by default
    monkeypatch.setattr(fused_decode, "ENABLED", True)
    assert fused_decode.applies(m) and not fused_decode.applies(m.set_gemm(None))


@cuda
@torch.inference_mode()
@pytest.mark.parametrize("rows", [1, 16, 64, 256])  # 64: cuBLAS for the narrow products; 256: for all
def test_graph_step_with_fused_norms_matches_unfused(rows, monkeypatch):
    from engine.cuda_graphs import DecodeGraphs

    m = tiny("qwen3", torch.bfloat16, hidden=256, inter=512, device="cuda")
    gen = torch.Generator("cuda").manual_seed(1)
    outs = []
    for on in (False, True):
        monkeypatch.setattr(fused_decode, "ENABLED", on)
        kc, vc = (torch.randn(3, 2000, 2, 64, device="cuda", generator=gen.manual_seed(1)).bfloat16() for _ in range(2))
        g = DecodeGraphs(m, kc, vc, max_context=64, buckets=(rows,), sample=False)
        g.capture()
        contexts = [list(range(7 * (i % 50), 7 * (i % 50) + 20)) + [1000 + i] for i in range(rows)]
        outs.append(g.run([3 + i % 290 for i in range(rows)], [20] * rows, contexts).clone())
    ref = outs[0]
    assert (outs[1] - ref).abs().max() <= 0.03 * ref.abs().max()  # rounding: the norms' sums run in other orders
