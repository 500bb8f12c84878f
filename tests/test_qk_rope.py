"""q/k head norm + RoPE as one op (engine/qk_rope.py): on the CPU the op is the model's own torch code (bit-equal,
fake kernel for torch.compile, gradients keep the reference); on the GPU the Triton kernel against that
reference within the model dtype's rounding, for Qwen3 (norm) and Llama (RoPE only) heads."""
import pytest
import torch

from engine.model import ModelArgs
from engine.qk_rope import norm_rope, qk_norm_rope, reference
from engine.rope import Rotary, apply_rope

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def inputs(t, hq, hkv, d, norm, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    args = ModelArgs("qwen3", 100, 64, 64, 1, hq, hkv, d, rope_theta=1e6)
    cos, sin = Rotary(args).to(device).cos_sin(torch.randint(0, 5000, (t,), generator=g).to(device), dtype)
    full = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(device, dtype)  # the q/k/v output
    qk = full[:, :(hq + hkv) * d].view(t, hq + hkv, d)  # a strided view, as the model passes it
    w = [(torch.rand(d, generator=g) + 0.5).to(device, dtype) for _ in range(2)] if norm else [None, None]
    return qk, w[0], w[1], hq, 1e-6, cos, sin


def test_reference_is_the_models_norm_then_rope():
    from engine.model import rms_norm

    qk, wq, wk, hq, eps, cos, sin = inputs(5, 4, 2, 16, True)
    q, k = qk.split([hq, 2], 1)
    want = torch.cat([apply_rope(rms_norm(q, wq, eps), cos, sin), apply_rope(rms_norm(k, wk, eps), cos, sin)], 1)
    assert torch.equal(reference(qk, wq, wk, hq, eps, cos, sin), want)
    assert torch.equal(reference(qk, None, None, hq, eps, cos, sin), apply_rope(qk, cos, sin))


@pytest.mark.parametrize("norm", [True, False])
def test_op_on_cpu_is_the_reference_and_compiles(norm):
    args = inputs(6, 4, 2, 16, norm)
    out = qk_norm_rope(*args)
    assert out.is_contiguous() and torch.equal(out, reference(*args))
    torch.library.opcheck(torch.ops.npr.qk_norm_rope.default, args)
    fn = torch.compile(lambda x: qk_norm_rope(x, *args[1:]) * 2, dynamic=True)
    torch.testing.assert_close(fn(args[0]), out * 2)


def test_training_forward_keeps_gradients_and_bad_weights_are_refused():
    qk, wq, wk, hq, eps, cos, sin = inputs(3, 4, 2, 16, True)
    qk = qk.clone().requires_grad_()
    norm_rope(qk, wq, wk, hq, eps, cos, sin).sum().backward()  # the op has no backward: the reference runs
    assert qk.grad is not None and qk.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="both q and k norm weights"):
        qk_norm_rope(qk.detach(), wq, None, hq, eps, cos, sin)
    with pytest.raises(ValueError, match=r"cos / sin"):  # positions of another batch
        qk_norm_rope(qk.detach(), wq, wk, hq, eps, cos[:2], sin[:2])
    with pytest.raises(ValueError, match="norm weights"):
        qk_norm_rope(qk.detach(), wq[:8], wk[:8], hq, eps, cos, sin)


@cuda
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("t,hq,hkv,d", [(1, 32, 8, 128), (7, 32, 8, 128), (300, 16, 8, 64), (5, 6, 2, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference(norm, t, hq, hkv, d, dtype):
    args = inputs(t, hq, hkv, d, norm, dtype, "cuda", seed=t + d)
    out = qk_norm_rope(*args)
    ref = reference(*args)
    assert out.dtype == dtype and out.shape == ref.shape
    # one rounding of the rotation where the torch code rounds each product: within 2 units of the last place
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    assert ((out.float() - ref.float()).abs() <= 2 * ulp * ref.float().abs().clamp_min(1)).all()
