"""RMSNorm in one launch (engine/triton_norm.py) for the engine's uncompiled decode steps: the routing on the CPU
(`CausalLM.set_norm` reaches every norm, the engine routes only its own fused model); on a GPU the kernel
against the model's torch code within one rounding of the model's dtype, and the reference wherever autograd
or torch.compile needs it."""
import pytest
import torch

from engine.llm import LLM
from engine.model import RMSNorm, rms_norm
from npr_async.config import EngineConfig
from npr_async.models import init_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_model("tiny", str(tmp_path_factory.mktemp("norm") / "m"), seed=0)


def norms(model) -> list[RMSNorm]:
    return [m for m in model.modules() if isinstance(m, RMSNorm)]


def test_set_norm_routes_every_norm_and_restores(tiny_dir):
    llm = LLM(tiny_dir, config=EngineConfig(kv_slots=256))
    model = llm.model
    assert norms(model) and all(m.kernel is None for m in norms(model))  # not on the CPU
    calls = []

    def spy(x, w, eps):
        calls.append(tuple(x.shape))
        return rms_norm(x, w, eps)

    x = torch.randn(3, model.args.hidden_size)
    layer = model.model.layers[0]
    ref = layer.input_layernorm(x)
    model.set_norm(spy)
    assert torch.equal(layer.input_layernorm(x), ref) and calls == [tuple(x.shape)]
    assert all(m.kernel is spy for m in norms(model))
    model.set_norm(None)
    assert all(m.kernel is None for m in norms(model))
    assert torch.equal(layer.input_layernorm(x), ref) and len(calls) == 1


def test_each_residual_add_goes_to_the_next_norm(tiny_dir):
    """The model leaves each layer's last residual add to the next norm (`RMSNorm.add`, through `kernel.add` when
    the kernel has one): 2L fused sites and one plain norm (the first layer's) per forward, the same values."""
    llm = LLM(tiny_dir, config=EngineConfig(kv_slots=256))
    model, n_layers = llm.model, llm.model.args.num_layers
    ids, pos = torch.tensor([5, 9, 2, 7]), torch.arange(4)

    def forward():
        llm.attn.prepare([(list(range(4)), 4)])
        with torch.no_grad():
            return model(ids, pos, llm.attn)

    want = forward()
    calls = {"norm": 0, "add": 0}

    def kernel(x, w, eps):
        calls["norm"] += 1
        return rms_norm(x, w, eps)

    def add(x, delta, w, eps):
        calls["add"] += 1
        h = x + delta
        return h, rms_norm(h, w, eps)

    kernel.add = add
    model.set_norm(kernel)
    try:
        got = forward()
    finally:
        model.set_norm(None)
    assert torch.equal(got, want) and calls == {"norm": 1, "add": 2 * n_layers}


@cuda
def test_kernel_matches_the_reference():
    pytest.importorskip("triton")
    from engine.triton_norm import add_rms_norm, rms_norm as kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    cases = [((7,), 2560, torch.bfloat16, torch.bfloat16), ((5, 3), 128, torch.bfloat16, torch.float32),
             ((33,), 1000, torch.float16, torch.float16), ((4,), 96, torch.float32, torch.float32)]
    for lead, d, xdt, wdt in cases:
        big = torch.randn(*lead, d + 24, device="cuda", generator=g) * 3
        x = big[..., :d].to(xdt)  # rows with a stride, as a view of a wider output
        w = (torch.rand(d, device="cuda", generator=g) + 0.5).to(wdt)
        out, ref = kernel(x, w, 1e-6), rms_norm(x, w, 1e-6)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        # the row's sum of squares is reduced in another order: rstd may differ in its last float32 bit, which
        # moves every float32 output by an ulp or so and flips a rare half-precision rounding
        half = xdt != torch.float32
        tol = dict(rtol=2 * torch.finfo(xdt).eps, atol=1e-6) if half else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, ref, **tol)
        assert not half or (out == ref).float().mean() > 0.98
        delta = torch.randn(x.shape, device="cuda", generator=g).to(xdt)
        h, out = add_rms_norm(x, delta, w, 1e-6)
        assert torch.equal(h, x + delta)  # one rounding of the same float32 sum
        torch.testing.assert_close(out, rms_norm(x + delta, w, 1e-6), **tol)
    assert kernel(torch.empty(0, 64, device="cuda"), torch.ones(64, device="cuda"), 1e-6).shape == (0, 64)
    with pytest.raises(ValueError, match="weight"):
        kernel(torch.randn(3, 8, device="cuda"), torch.ones(4, device="cuda"), 1e-6)


@cuda
def test_reference_where_autograd_or_compile_needs_it(monkeypatch):
    pytest.importorskip("triton")
    from engine import triton_norm

    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    w = torch.rand(256, device="cuda")
    y = triton_norm.decode_rms_norm(x, w, 1e-6)
    assert y.grad_fn is not None and torch.equal(y, rms_norm(x, w, 1e-6))

    def refuse(*args):
        raise AssertionError("the kernel ran inside a compiled function")

    h, y = triton_norm.decode_add_rms_norm(x, x.detach(), w, 1e-6)
    assert y.grad_fn is not None and torch.equal(y, rms_norm(x + x.detach(), w, 1e-6))

    monkeypatch.setattr(triton_norm, "rms_norm", refuse)
    monkeypatch.setattr(triton_norm, "add_rms_norm", refuse)
    fn = torch.compile(lambda t: triton_norm.decode_rms_norm(t, w, 1e-6) * 2
                       + triton_norm.decode_add_rms_norm(t, t, w, 1e-6)[1])
    with torch.no_grad():
        t = x.detach()
        torch.testing.assert_close(fn(t), rms_norm(t, w, 1e-6) * 2 + rms_norm(t + t, w, 1e-6))


@cuda
def test_engine_model_forward_with_the_kernels_matches_without(tiny_dir):
    """The engine's own model on a GPU in bf16, one eager forward with and without the norm kernels (attention
    through the torch backend): hidden states within bf16 rounding of each other."""
    pytest.importorskip("triton")
    from engine.triton_norm import decode_rms_norm

    llm = LLM(tiny_dir, config=EngineConfig(kv_slots=256, attention_backend="torch"), device="cuda",
              dtype=torch.bfloat16)
    ids, pos = torch.tensor([5, 9, 2, 7, 11], device="cuda"), torch.arange(5, device="cuda")

    def forward():
        llm.attn.prepare([(list(range(5)), 5)])
        with torch.no_grad():
            return llm.model(ids, pos, llm.attn).float()

    assert llm.model.model.norm.kernel is decode_rms_norm
    got = forward()
    llm.model.set_norm(None)
    want = forward()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    assert (got - want).abs().mean() < 0.01 * want.abs().mean()


@cuda
def test_engine_routes_its_own_model_only(tiny_dir):
    pytest.importorskip("triton")
    from engine.triton_norm import decode_rms_norm

    own = LLM(tiny_dir, config=EngineConfig(kv_slots=256), device="cuda", dtype=torch.bfloat16)
    assert all(m.kernel is decode_rms_norm for m in norms(own.model))
    shared = LLM(own.model.__class__(own.model.args), own.tokenizer, EngineConfig(kv_slots=256), device="cuda")
    assert all(m.kernel is None for m in norms(shared.model))  # unfused: maybe a learner's
