"""The chained MLP launch (engine/triton_chained_mlp.py, an experiment) vs torch (GPU only; CI skips these)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def reference(x, w_gate_up, w_down):
    """SwiGLU MLP rounded as the engine's skinny GEMM rounds it: gate/up products in x's dtype, then silu(g) * u."""
    g, u = (x.float() @ w_gate_up.float().T).to(x.dtype).float().chunk(2, -1)
    act = (g * torch.sigmoid(g) * u).to(x.dtype)
    return (act.float() @ w_down.float().T).to(x.dtype)


@pytest.mark.parametrize("m,h,i,kw", [
    (5, 128, 256, dict(splits=4, bn1=32, bk1=64, bn2=32, bk2=64, programs=3)),
    (1, 256, 512, dict(splits=3, bn1=32, bk1=64, bn2=64, bk2=32, programs=7)),
    (64, 2560, 9728, dict()),  # Qwen3-4B, the engine's defaults
])
def test_chained_mlp_matches_torch_and_rearms(m, h, i, kw, dev="cuda", dtype=torch.bfloat16):
    from engine.triton_chained_mlp import _counters, chained_mlp

    gen = torch.Generator().manual_seed(m + h)
    x = torch.randn(m, h, generator=gen).to(dev, dtype)
    wgu = (torch.randn(2 * i, h, generator=gen) / h ** 0.5).to(dev, dtype)
    wd = (torch.randn(h, i, generator=gen) / i ** 0.5).to(dev, dtype)
    ref = reference(x, wgu, wd)
    for _ in range(2):  # the second launch finds its counters re-armed by the first
        y = chained_mlp(x, wgu, wd, **kw)
        err = float((y.float() - ref.float()).norm() / ref.float().norm())
        assert err < 1e-2, err
    assert all(int(c.abs().sum()) == 0 for c in _counters.__globals__["_COUNTERS"].values())


def test_bad_shapes_are_refused(dev="cuda"):
    from engine.triton_chained_mlp import chained_mlp, fits

    x = torch.zeros(4, 128, dtype=torch.bfloat16, device=dev)
    with pytest.raises(ValueError, match="M <= 64"):
        chained_mlp(torch.zeros(65, 128, dtype=torch.bfloat16, device=dev), torch.zeros(512, 128, device=dev),
                    torch.zeros(128, 256, device=dev))
    with pytest.raises(ValueError, match="divide into the tiles"):
        chained_mlp(x, torch.zeros(2 * 100, 128, dtype=torch.bfloat16, device=dev),
                    torch.zeros(128, 100, dtype=torch.bfloat16, device=dev))
    # 3 k-ranges of 2 + 2 + 1 gate/up tiles: the last range's 32 columns are not a whole 64-wide K step
    w_gu, w_d = torch.zeros(2 * 160, 128, dtype=x.dtype, device=dev), torch.zeros(128, 160, dtype=x.dtype, device=dev)
    assert not fits(x, w_gu, w_d, splits=3)
    with pytest.raises(ValueError, match="divide into the tiles"):
        chained_mlp(x, w_gu, w_d, splits=3, bk1=64)


@torch.inference_mode()
@pytest.mark.parametrize("rows", [1, 16])
def test_engine_mlp_as_one_launch_keeps_the_logits(monkeypatch, rows):
    """decode_linear.CHAINED_MLP routes a decode step's MLPs (set_gemm(decode_linear)) to the one launch:
    the model's logits stay within bf16 rounding of the two-launch MLP's, and the chained kernel ran."""
    from engine import decode_linear as dl
    from engine import triton_chained_mlp
    from engine.attention import MaskedAttention
    from engine.model import CausalLM, ModelArgs

    cfg = dict(model_type="qwen3", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    torch.manual_seed(0)
    model = CausalLM(ModelArgs.from_hf_config(cfg)).to("cuda", torch.bfloat16).eval().fuse_projections()
    model.set_gemm(dl.decode_linear)
    ids, pos = torch.randint(0, 1000, (rows,), device="cuda"), torch.arange(rows, device="cuda")
    attn = MaskedAttention(torch.ones(rows, rows, dtype=torch.bool, device="cuda").tril())
    ref = model.compute_logits(model(ids, pos, attn))
    calls = []
    chained = triton_chained_mlp.chained_mlp
    monkeypatch.setattr(triton_chained_mlp, "chained_mlp", lambda *a, **k: (calls.append(1), chained(*a, **k))[1])
    monkeypatch.setattr(dl, "CHAINED_MLP", True)
    out = model.compute_logits(model(ids, pos, attn))
    assert len(calls) == 2  # one per layer
    assert float((out - ref).norm() / ref.norm()) < 2e-2
