"""The CUDA learner path (compiled layers, bf16 compute copy, flex BlockMask) against the eager fp32 path.

GPU only; CI skips these. Run on a GPU box: `python3 -m pytest -q tests/test_learner_gpu.py`.
"""
from __future__ import annotations

import copy

import msgspec
import numpy as np
import pytest
import torch

from engine.model import CausalLM, ModelArgs
from npr_async.config import LearnerConfig
from npr_async.training.forward import compiled_versions
from npr_async.training.packing import Sample, pack
from npr_async.training.trainer import Trainer, microbatch_logprobs
from tests.learner_trees import random_trajectory

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
FP32 = LearnerConfig(loss="papo", lr=1e-3, micro_batch_tokens=512, compile=False, mixed_precision="off")
FAST = msgspec.structs.replace(FP32, compile=True, mixed_precision="bf16", activation_checkpointing=True,
                               checkpoint_layers=2)


def small_model(seed=0) -> CausalLM:
    torch.manual_seed(seed)
    args = ModelArgs(model_type="qwen3", vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=64, qk_norm=True, tie_word_embeddings=True)
    model = CausalLM(args).to(CUDA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def groups(n_groups=3, per_group=6, seed=0):
    rng = np.random.default_rng(seed)
    return [([random_trajectory(1000 * seed + 10 * g + i, max_depth=3, prompt_id=f"q{g}", sample_idx=i)
              for i in range(per_group)], list(rng.choice([-1.0, 1.0, 0.5], size=per_group)))
            for g in range(n_groups)]


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_compiled_bf16_step_matches_eager_fp32_without_recompiles():
    base = small_model()
    ref, fast = Trainer(copy.deepcopy(base), FP32), Trainer(copy.deepcopy(base), FAST)
    assert fast.compute is not None and fast.forward.compiled and fast.forward.checkpoint_layers == {0, 1}
    before = compiled_versions()
    data = groups()
    lengths = set()
    for tr in (ref, fast):
        for trajs, rewards in data:  # groups differ in length: micro-batches of several token counts
            tr.accumulate(trajs, rewards)
        tr.scale_gradients()
    for trajs, _ in data:
        lengths |= {mb.num_tokens for mb in pack([Sample.from_trajectory(t) for t in trajs], 512)}
    assert len(lengths) >= 3
    after = compiled_versions()
    assert {k: after[k] - before.get(k, 0) for k in after} == {k: 1 for k in after}  # no recompiles
    g32, g16 = flat_grads(ref.model), flat_grads(fast.model)
    assert g16.dtype == torch.float32 and float(g32.abs().max()) > 1e-4
    assert rel_err(g16, g32) < 0.05, rel_err(g16, g32)

    m32, m16 = ref.finish_step(), fast.finish_step()
    assert abs(m16["loss"] - m32["loss"]) < 0.02 * abs(m32["loss"]) + 1e-3
    for (n, m), (_, c) in zip(fast.model.named_parameters(), fast.compute.model.named_parameters()):
        assert m.dtype == torch.float32 and torch.equal(m.to(torch.bfloat16), c), n


def test_compiled_bf16_logprobs_match_eager_fp32():
    base = small_model(1)
    fast = Trainer(copy.deepcopy(base), FAST)
    samples = [Sample.from_trajectory(t) for t in groups(1, 6, seed=1)[0][0]]
    mb = pack(samples, 4096)[0]
    with torch.no_grad():
        want = microbatch_logprobs(base, mb, CUDA)  # eager fp32, the model's own forward
        eager16 = microbatch_logprobs(fast.compute.model, mb, CUDA)  # bf16 copy, eager
        got = microbatch_logprobs(fast.compute.model, mb, CUDA, forward=fast.forward)
    assert float(want.min()) < -5.0  # far from constant
    assert rel_err(got, want) < 0.01, rel_err(got, want)
    assert rel_err(got, want) < 2 * rel_err(eager16, want) + 1e-3  # compiling adds no error of its own
