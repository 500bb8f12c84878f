"""learner.compile on CPU (inductor's C++ backend): same gradients as eager, one compilation for every
layer, micro-batch length and logit chunk. The CUDA path (bf16, flex) is tests/test_learner_gpu.py."""
from __future__ import annotations

import copy
import shutil

import msgspec
import pytest
import torch

from npr_async.config import LearnerConfig
from npr_async.training.forward import compiled_versions
from npr_async.training.trainer import Trainer
from tests.learner_trees import tiny_model
from tests.test_learner_streaming import grads, make_groups

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                 reason="inductor on CPU needs a C++ compiler")]


def test_compiled_learner_equals_eager_without_recompiles(monkeypatch):
    import npr_async.training.logprobs as logprobs

    monkeypatch.setattr(logprobs, "LOGIT_CHUNK", 64)  # several chunks with a ragged last one
    groups = make_groups(3, 3)  # 3 accumulate calls, micro-batches of several lengths
    eager_cfg = LearnerConfig(loss="papo", micro_batch_tokens=150, compile=False,
                              activation_checkpointing=True, checkpoint_layers=1)
    base = tiny_model(8)
    eager, comp = Trainer(copy.deepcopy(base), eager_cfg), Trainer(copy.deepcopy(base),
                                                                   msgspec.structs.replace(eager_cfg, compile=True))
    assert comp.forward.compiled and not eager.forward.compiled
    for tr in (eager, comp):
        for trajs, rewards in groups:
            tr.accumulate(trajs, rewards)
        tr.scale_gradients()
    ge, gc = grads(eager.model), grads(comp.model)
    assert max(float(g.abs().max()) for g in ge.values()) > 1e-3
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-5, msg=n)
    assert compiled_versions() == {"attention_inputs": 1, "attention_output_mlp": 1, "lse_and_target": 1,
                                   "logits_grad": 1}


def test_compiled_layer_keeps_only_what_backward_needs():
    """Saved activations of one compiled layer (bf16), attention excluded: x, q/k before their norms, the
    attention output, the post-attention residual and gate/up; normed inputs and silu(gate)·up recomputed."""
    from npr_async.training.forward import TrainingForward

    model = tiny_model(2).to(torch.bfloat16)
    a, layer, t = model.args, model.model.layers[0], 96
    x = torch.randn(t, a.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = model.model.rotary_emb.cos_sin(torch.arange(t), torch.bfloat16)
    skip = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    skip |= {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(x_):
        if x_.untyped_storage().data_ptr() not in skip:
            saved[x_.untyped_storage().data_ptr()] = x_.untyped_storage().nbytes()
        return x_

    fwd = TrainingForward(a.num_layers, compiled=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x_: x_):
        fwd.layer(layer, x, cos, sin, lambda i, q, k, v: q * 1.0).sum().backward()  # attention saving nothing
    hq, hkv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    needed = 2 * (2 * a.hidden_size + 2 * hq + hkv + 2 * a.intermediate_size)  # bf16 tensors, bytes per token
    stats = 4 * (2 + a.num_heads + a.num_kv_heads)  # fp32 rsqrt of the 2 norms and of each q/k head
    assert sum(saved.values()) / t <= needed + stats
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
