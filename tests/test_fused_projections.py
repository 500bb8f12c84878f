"""Fused q/k/v and gate/up projections (engine only): same logits, HF-named weight updates and weight-sync
receives land in the fused weights, the engine decodes the same trajectories fused or not (CPU)."""
import pytest
import torch

from engine.model import CausalLM, ModelArgs
from engine.attention import MaskedAttention

CFG = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def model(model_type="qwen3", seed=0, tied=True):
    torch.manual_seed(seed)
    m = CausalLM(ModelArgs.from_hf_config({**CFG, "model_type": model_type, "tie_word_embeddings": tied})).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a misplaced row would show
        for n, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.2 * torch.randn_like(p))
    return m


def logits(m, ids, pos):
    from engine.attention import CausalAttention

    with torch.no_grad():
        return m.compute_logits(m(ids, pos, CausalAttention()))


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, CFG["vocab_size"], (12,), generator=g), torch.arange(12)


@pytest.mark.parametrize("model_type,tied", [("qwen3", True), ("qwen2", False), ("llama", False)])
def test_fused_logits_equal_unfused(model_type, tied):
    m = model(model_type, tied=tied)
    ref = logits(m, *inputs())
    hf_names = set(m.state_dict())
    m.fuse_projections().fuse_projections()  # idempotent
    assert m.fused
    modules = {n.split(".")[-2] for n, _ in m.named_parameters()}
    assert {"qkv_proj", "gate_up_proj"} <= modules and not modules & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    torch.testing.assert_close(logits(m, *inputs()), ref, rtol=1e-5, atol=1e-5)
    targets = m.named_weight_targets()
    assert set(targets) == hf_names - ({"lm_head.weight"} if tied else set())


def test_weight_targets_are_views_of_the_fused_weights():
    m = model().fuse_projections()
    t = m.named_weight_targets()
    attn, mlp = m.model.layers[1].self_attn, m.model.layers[1].mlp
    q, k, v = (t[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert q.shape == (64, 64) and k.shape == v.shape == (32, 64) and q.is_contiguous() and v.is_contiguous()
    w = attn.qkv_proj.weight
    assert q.data_ptr() == w.data_ptr() and v.data_ptr() == w[96:].data_ptr()
    up = t["model.layers.1.mlp.up_proj.weight"]
    assert up.shape == (96, 64) and up.data_ptr() == mlp.gate_up_proj.weight[96:].data_ptr()


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
def test_update_by_hf_names_lands_in_fused_weights(model_type):
    src, dst = model(model_type, seed=1), model(model_type, seed=2).fuse_projections()
    assert dst.load_weights(src.state_dict().items()) == len(dst.named_weight_targets())
    torch.testing.assert_close(logits(dst, *inputs()), logits(src, *inputs()), rtol=1e-5, atol=1e-5)
    # the fused model's own parameter names are accepted too (e.g. a fused state dict)
    other = model(model_type, seed=3).fuse_projections()
    other.load_weights(dst.state_dict().items())
    torch.testing.assert_close(logits(other, *inputs()), logits(src, *inputs()), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError):
        dst.load_weights([("model.layers.0.self_attn.qkv.weight", torch.zeros(1))])


def test_weight_sync_receive_into_weight_targets():
    """The weight-sync receiver's bucket path (plan -> pack -> check -> unpack) into the HF-named views."""
    from npr_async.transport import buckets

    src, dst = model(seed=1), model(seed=2).fuse_projections()
    sent = dict(src.named_parameters())
    layout = buckets.plan(sent, bucket_bytes=64 << 10)
    into = buckets.named_tensors(dst.named_weight_targets())
    assert buckets.mismatches(layout, into) == []
    for b in layout.buckets:
        buf = torch.empty(b.nbytes, dtype=torch.uint8)
        buckets.pack(b, sent, buf)
        direct = buckets.direct_view(b, into)  # as the receiver does: straight in when the layouts agree
        direct.copy_(buf) if direct is not None else buckets.unpack(b, buf, into)
    torch.testing.assert_close(logits(dst, *inputs()), logits(src, *inputs()), rtol=1e-5, atol=1e-5)


def test_engine_same_trajectories_fused_or_not(tmp_path):
    from engine import LLM, SamplingParams
    from npr_async.config import EngineConfig
    from npr_async.models import init_model

    d = init_model("tiny", str(tmp_path / "m"), seed=0)
    q = "Question: add 17 and 25.\n<guideline>" + "".join(f"<plan>{k}: way {k}</plan>" for k in (1, 2, 3))
    prompts = [q + "</guideline>", "Question: add 1 and 2.\n"]
    p = SamplingParams(temperature=1.0, seed=1, repetition_penalty=1.0, branch_repetition_penalty=1.0,
                       max_total_tokens=80, max_path_tokens=60, max_step_tokens=8, max_plans=5)
    runs = []
    for fuse in (False, True):
        llm = LLM(d, config=EngineConfig(kv_slots=2048, max_batch_tokens=256), fuse=fuse)
        assert llm.model.fused == fuse
        g = torch.Generator().manual_seed(0)
        named = [(n, (1 + 0.2 * torch.randn(t.shape, generator=g)) if "norm" in n else
                  0.15 * torch.randn(t.shape, generator=g)) for n, t in model_state(d).items()]
        assert llm.update_weights(named, version=1) == len(llm.weight_targets())
        runs.append(llm.generate(prompts, p))
    assert runs[0][0].num_forks == 1
    for a, b in zip(*runs):
        assert a.ids().tolist() == b.ids().tolist()
        torch.testing.assert_close(torch.tensor(a.lps()), torch.tensor(b.lps()), rtol=1e-4, atol=1e-4,
                                   equal_nan=True)


def model_state(d):
    from engine.loader import load_model

    return load_model(d).state_dict()  # HF names, in HF order


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_decode_gemm_routes_whole_mlp_and_keeps_the_forward(mlp_bias):
    """set_gemm(decode_linear) hands bias-free fused MLPs the one-op `decode_mlp` (with a bias: gate/up + SwiGLU
    and down apart); off the GPU every op is the torch reference, so the forward equals the plain model's, and a
    forward that needs gradients still gets them."""
    from engine.decode_linear import decode_linear
    from engine.model import MLP, CausalLM, ModelArgs

    cfg = dict(model_type="qwen3", vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, mlp_bias=mlp_bias)
    torch.manual_seed(0)
    model = CausalLM(ModelArgs.from_hf_config(cfg)).eval().fuse_projections()
    ids, pos = torch.randint(0, 200, (7,)), torch.arange(7)
    attn = MaskedAttention(torch.ones(7, 7, dtype=torch.bool).tril())
    with torch.no_grad():
        ref = model(ids, pos, attn)
        model.set_gemm(decode_linear)
        mlps = [m for m in model.modules() if isinstance(m, MLP)]
        assert all(m.whole is decode_linear.mlp for m in mlps)
        out = model(ids, pos, attn)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    model(ids, pos, attn).sum().backward()
    assert all(m.gate_up_proj.weight.grad is not None and m.down_proj.weight.grad is not None for m in mlps)
