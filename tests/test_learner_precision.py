"""The bf16 compute copy (fp32 master grads via hooks) and selective checkpointing, on CPU."""
from __future__ import annotations

import copy

import msgspec
import pytest
import torch

from npr_async.config import ConfigError, LearnerConfig, config_from_dict
from npr_async.training.forward import TrainingForward, checkpointed_layers, resolve_compile
from npr_async.training.packing import Sample, pack
from npr_async.training.precision import ComputeCopy, resolve_precision
from npr_async.training.trainer import Trainer, microbatch_logprobs
from tests.learner_trees import random_trajectory, tiny_model
from tests.test_learner_streaming import grads, make_groups

CPU = torch.device("cpu")


def microbatches(seed=0, max_tokens=150):
    samples = [Sample.from_trajectory(random_trajectory(seed + i)) for i in range(5)]
    mbs = pack(samples, max_tokens)
    assert len(mbs) >= 2
    return mbs


def backward_all(model, mbs, forward=None):
    for mb in mbs:
        lp = microbatch_logprobs(model, mb, CPU, forward=forward)
        (lp * torch.linspace(-1, 1, len(lp))).sum().backward()


@pytest.mark.parametrize("layers", [frozenset(), frozenset({1}), frozenset({0, 1})])
def test_training_forward_equals_model_forward(layers):
    """Selective checkpointing changes memory, never values: same logprobs and gradients as the model's forward."""
    mbs = microbatches()
    a, b = tiny_model(3), tiny_model(3)
    backward_all(a, mbs)
    backward_all(b, mbs, TrainingForward(2, checkpoint_layers=layers))
    ga, gb = grads(a), grads(b)
    assert set(ga) == set(gb) and max(float(g.abs().max()) for g in ga.values()) > 1e-3
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=0, atol=1e-6, msg=n)


def test_compute_copy_accumulates_exactly_into_master_grads():
    """A float32 copy: the hooks' fp32 accumulation over micro-batches equals autograd's own, bitwise."""
    mbs = microbatches(seed=10)
    plain, master = tiny_model(4), tiny_model(4)
    backward_all(plain, mbs)
    cc = ComputeCopy(master, torch.float32)
    backward_all(cc.model, mbs)
    assert all(p.grad is None for p in cc.model.parameters())  # freed as soon as moved to the master
    for (n, p), (_, m) in zip(plain.named_parameters(), master.named_parameters()):
        assert torch.equal(p.grad, m.grad), n
    with torch.no_grad():
        for p in master.parameters():
            p.add_(0.5)
    cc.refresh()
    for (n, m), (_, c) in zip(master.named_parameters(), cc.model.named_parameters()):
        assert torch.equal(m, c), n


def test_bf16_trainer_matches_fp32_and_keeps_fp32_masters(tmp_path):
    groups = make_groups(2, 3)
    cfg32 = LearnerConfig(loss="papo", lr=1e-2, micro_batch_tokens=150)
    cfg16 = msgspec.structs.replace(cfg32, mixed_precision="bf16", activation_checkpointing=True, checkpoint_layers=1)
    base = tiny_model(5)
    t32, t16 = Trainer(copy.deepcopy(base), cfg32), Trainer(copy.deepcopy(base), cfg16)
    assert t32.compute is None and t16.compute is not None and t16.forward.checkpoint_layers == {0}
    for tr in (t32, t16):
        for trajs, rewards in groups:
            tr.accumulate(trajs, rewards)
        tr.scale_gradients()
    g32, g16 = grads(t32.model), grads(t16.model)
    assert all(g.dtype == torch.float32 for g in g16.values())
    flat32 = torch.cat([g32[n].flatten() for n in g32])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    assert float((flat16 - flat32).norm() / flat32.norm()) < 0.05  # bf16 compute, same gradient
    t16._optimizer_step(t16.totals, 1.0)
    for (n, m), (_, c) in zip(t16.model.named_parameters(), t16.compute.model.named_parameters()):
        assert m.dtype == torch.float32 and c.dtype == torch.bfloat16
        assert torch.equal(m.to(torch.bfloat16), c), n  # the copy follows the stepped masters
    t16.save(tmp_path / "ck")
    t2 = Trainer(tiny_model(9), cfg16)
    t2.load(tmp_path / "ck")  # loading refreshes the copy too
    for (n, m), (_, c) in zip(t16.model.named_parameters(), t2.compute.model.named_parameters()):
        assert torch.equal(m.to(torch.bfloat16), c), n


def test_option_resolution_and_errors():
    assert checkpointed_layers(4, False, -1) == frozenset()
    assert checkpointed_layers(4, True, -1) == {0, 1, 2, 3}
    assert checkpointed_layers(4, True, 2) == {0, 1} and checkpointed_layers(4, True, 9) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="checkpoint_layers"):
        checkpointed_layers(4, True, -2)
    with pytest.raises(ValueError, match="outside"):
        TrainingForward(2, checkpoint_layers=frozenset({2}))
    cuda = torch.device("cuda")
    assert resolve_compile("auto", CPU, False) is False and resolve_compile("auto", cuda, False) is True
    assert resolve_compile("auto", cuda, True) is False and resolve_compile(True, CPU, False) is True
    with pytest.raises(ValueError, match="fsdp"):
        resolve_compile(True, cuda, True)
    assert resolve_precision("auto", CPU, False) == "off" and resolve_precision("auto", cuda, False) == "bf16"
    assert resolve_precision("auto", cuda, True) == "autocast"
    with pytest.raises(ValueError, match="fsdp"):
        resolve_precision("bf16", cuda, True)
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_precision("fp8", cuda, False)
    cfg = config_from_dict({"learner": {"compile": True, "checkpoint_layers": 12, "mixed_precision": "autocast"}})
    assert cfg.learner.compile is True and cfg.learner.checkpoint_layers == 12
    for bad in ({"compile": "on"}, {"checkpoint_layers": -2}, {"mixed_precision": "fp16"}):
        with pytest.raises(ConfigError, match=f"learner.{next(iter(bad))}"):
            config_from_dict({"learner": bad})


@pytest.mark.parametrize("precision", ["off", "bf16"])
def test_step_with_every_sample_filtered_leaves_weights(precision):
    tr = Trainer(tiny_model(6), LearnerConfig(loss="papo", lr=1e-2, mixed_precision=precision))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    trajs = [random_trajectory(50 + i, finish_reason="format_error") for i in range(3)]
    assert tr.accumulate(trajs, [1.0, -1.0, 0.5]) == 0
    m = tr.finish_step()
    assert m["sequences"] == 0 and m["dropped"] == 3 and tr.step == 1
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())
