"""The engine's decode GEMM: engine/triton_gemm.py against a float32 F.linear (GPU: every split count, ragged
N and K, bias, determinism, the per-tile locks re-armed, inside a CUDA graph), and the routing through
engine/decode_linear.py (CPU: the custom op's fake kernel under torch.compile, CausalLM.set_gemm reaches every
projection and the LM head, training forwards keep autograd)."""
import pytest
import torch
import torch.nn.functional as F

from engine.decode_linear import decode_linear, decode_swiglu
from engine.model import CausalLM, ModelArgs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CFG = dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
           tie_word_embeddings=True)  # qwen2: q/k/v carry biases


def tiny(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelArgs.from_hf_config(CFG)).eval()


def forward(m, n=7):
    from engine.attention import CausalAttention

    ids = torch.randint(0, CFG["vocab_size"], (n,), generator=torch.Generator().manual_seed(1))
    return m.compute_logits(m(ids, torch.arange(n), CausalAttention()))


@torch.no_grad()
def test_set_gemm_routes_every_product_and_changes_nothing_on_cpu():
    m = tiny()
    ref = forward(m)
    calls = []

    def counting(x, w, b):
        calls.append(tuple(w.shape))
        return decode_linear(x, w, b)

    m.fuse_projections().set_gemm(counting)
    assert torch.equal(forward(m), ref)  # on the CPU the op is F.linear: bit-equal
    layers = CFG["num_hidden_layers"]
    assert len(calls) == 4 * layers + 1  # qkv, o, gate_up, down per layer + the LM head
    assert calls[-1] == (CFG["vocab_size"], CFG["hidden_size"])
    m.set_gemm(None)
    calls.clear()
    assert torch.equal(forward(m), ref) and not calls


def swiglu_reference(x, w, b=None):
    """SwiGLU of the fused gate/up product as the unfused model computes it: the product rounded to x's dtype."""
    gate, up = F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype).float().chunk(2, -1)
    return F.silu(gate) * up


@torch.no_grad()
def test_fused_mlp_takes_the_gemms_swiglu_and_changes_nothing_on_cpu():
    m = tiny().fuse_projections()
    ref = forward(m)
    m.set_gemm(decode_linear)
    assert all(layer.mlp.swiglu is decode_swiglu for layer in m.model.layers)
    assert torch.equal(forward(m), ref)  # on the CPU: F.linear, chunk, silu * up, as the model's own path
    m.set_gemm(None)
    assert all(layer.mlp.swiglu is None for layer in m.model.layers)


def test_decode_swiglu_op_fake_kernel_compile_and_autograd():
    x, w, b = torch.randn(4, 16), torch.randn(24, 16), torch.randn(24)
    torch.library.opcheck(torch.ops.npr.decode_swiglu.default, (x, w, b))
    torch.testing.assert_close(decode_swiglu(x, w, b), swiglu_reference(x, w, b))
    fn = torch.compile(lambda x: decode_swiglu(x, w, b) * 2, dynamic=True)
    for rows in (1, 5):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(fn(x), 2 * swiglu_reference(x, w, b))
    x = torch.randn(3, 16, requires_grad=True)  # a training forward: the differentiable reference
    decode_swiglu(x, w, b).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[2I, K\]"):
        decode_swiglu(x.detach(), w[:23], b[:23])  # an odd number of rows: no gate/up halves
    with pytest.raises(ValueError, match=r"\[2I, K\]"):
        decode_swiglu(torch.randn(3, 8), w, b)


def test_decode_linear_keeps_autograd_for_training_forwards():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    decode_linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.detach().sum(0).expand(3, 8))


def test_decode_linear_op_fake_kernel_and_compile():
    x, w, b = torch.randn(4, 16), torch.randn(24, 16), torch.randn(24)
    torch.library.opcheck(torch.ops.npr.decode_linear.default, (x, w, b))
    fn = torch.compile(lambda x: decode_linear(x, w, b).relu(), dynamic=True)
    for rows in (1, 5, 9):  # one dynamic-shape graph for every row count
        x = torch.randn(rows, 16)
        torch.testing.assert_close(fn(x), F.linear(x, w, b).relu())


@cuda
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("n,k,waves", [(2560, 4096, 2), (6144, 2560, 1), (1000, 1100, 8), (96, 4096, 64),
                                         (17000, 640, 2)])  # wide: the kernel up to 64 rows
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_float32_reference(m, n, k, waves, bias):
    from engine.triton_gemm import _LOCKS, config, skinny_linear

    g = torch.Generator(device="cuda").manual_seed(m * n + k)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    b = torch.randn(n, device="cuda", generator=g).bfloat16() if bias else None
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    y = skinny_linear(x, w, b, waves=waves)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=2e-2)  # bf16 rounding of the output
    assert torch.equal(skinny_linear(x, w, b, waves=waves), y)  # deterministic: no float atomics
    splits = config(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count, waves=waves)["splits"]
    if splits > 1:
        assert int(_LOCKS[x.device].abs().sum()) == 0  # every tile lock re-armed for the next launch


@cuda
@pytest.mark.parametrize("m,n,k,splits", [(1, 2560, 4096, 3), (16, 2560, 9728, 5), (64, 6144, 2560, 7),
                                           (40, 1000, 1100, 6), (256, 2560, 4096, 3)])
def test_skinny_linear_any_split_count(m, n, k, splits):
    """Split counts that are not powers of two: every split a whole number of K blocks, the last one shorter
    (K ragged too); the sum is still deterministic and the counters re-armed."""
    from engine.triton_gemm import _LOCKS, skinny_linear

    g = torch.Generator(device="cuda").manual_seed(k + splits)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    tune = dict(splits=splits, block_m=128 if m > 64 else None)
    y = skinny_linear(x, w, **tune)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=2e-2)
    assert torch.equal(skinny_linear(x, w, **tune), y)
    assert int(_LOCKS.get(x.device, torch.zeros(1)).abs().sum()) == 0


@cuda
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 256])  # 256: cuBLAS + the elementwise SwiGLU kernel
@pytest.mark.parametrize("i,k,splits", [(9728, 2560, None), (3072, 1024, 3), (1000, 1100, None)])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_swiglu_matches_reference(m, i, k, splits, bias):
    """SwiGLU in the GEMM's epilogue against the unfused math; for products the kernel does not take, the
    elementwise kernel after cuBLAS against silu * up of cuBLAS's own product (cuBLAS may reduce split-K
    partials in bf16: its product is not the float32 one rounded)."""
    from engine.triton_gemm import _LOCKS, skinny_linear, takes

    g = torch.Generator(device="cuda").manual_seed(m + i + k)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(2 * i, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    b = torch.randn(2 * i, device="cuda", generator=g).bfloat16() if bias else None
    kernel = splits is not None or takes(m, 2 * i)
    if kernel:
        ref = swiglu_reference(x, w, b)
    else:
        gate, up = F.linear(x, w, b).float().chunk(2, -1)
        ref = F.silu(gate) * up
    y = decode_swiglu(x, w, b) if splits is None else skinny_linear(x, w, b, gated=True, splits=splits)
    assert y.dtype == torch.bfloat16 and y.shape == (m, i)
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
    if kernel:
        assert torch.equal(skinny_linear(x, w, b, gated=True, splits=splits), skinny_linear(x, w, b, gated=True,
                                                                                              splits=splits))
        assert int(_LOCKS.get(x.device, torch.zeros(1)).abs().sum()) == 0


@cuda
def test_skinny_linear_in_a_cuda_graph():
    """Replays read the x written just before them, also along a chain of dependent products."""
    from engine.triton_gemm import skinny_linear

    x = torch.randn(8, 4096, device="cuda").bfloat16()
    w = (torch.randn(2560, 4096, device="cuda") / 64).bfloat16()
    w2 = (torch.randn(4096, 2560, device="cuda") / 50).bfloat16()
    chain = lambda: skinny_linear(skinny_linear(x * 2, w), w2)  # noqa: E731
    y0 = skinny_linear(x, w)  # warm-up: compiles, sizes the lock buffer
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        skinny_linear(x, w)
        chain()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_linear(x, w)
        z = chain()
    for _ in range(3):
        x.normal_()
        graph.replay()
        torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=2e-2)
        ref = F.linear(F.linear((x * 2).float(), w.float()).bfloat16().float(), w2.float())
        torch.testing.assert_close(z.float(), ref, rtol=2e-2, atol=5e-2)
    assert not torch.equal(y, y0)


@cuda
@torch.no_grad()
def test_engine_model_logits_with_triton_gemm():
    """The same bf16 model with F.linear (cuBLAS) and with the routed Triton GEMM: only the fp32 summation
    order differs, so the logits agree to a small fraction of their scale; every product took the kernel."""
    from engine import triton_gemm
    from engine.attention import CausalAttention

    m = tiny().cuda().bfloat16().fuse_projections()
    ids = torch.randint(0, CFG["vocab_size"], (7,), generator=torch.Generator().manual_seed(1)).cuda()
    run = lambda: m.compute_logits(m(ids, torch.arange(7, device="cuda"), CausalAttention()))  # noqa: E731
    ref = run()
    calls = []
    orig = triton_gemm.skinny_linear
    triton_gemm.skinny_linear = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        m.set_gemm(decode_linear)
        out = run()
    finally:
        triton_gemm.skinny_linear = orig
        m.set_gemm(None)
    assert len(calls) == 4 * CFG["num_hidden_layers"] + 1
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()
