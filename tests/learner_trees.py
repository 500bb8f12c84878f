"""Random NPR token trees for the learner tests: nested forks, parsed by the shared structure module."""
from __future__ import annotations

import numpy as np
import torch

from engine.model import CausalLM, ModelArgs
from npr_async.messages import Trajectory
from npr_async.structure import parse_structure
from npr_async.tags import NPR_TAGS, TagIds

VOCAB = 64
TAGS = TagIds({tag: i + 1 for i, tag in enumerate(NPR_TAGS)})  # tag ids 1..8; words are 9..VOCAB-1


def _words(rng, lo=1, hi=4):
    return list(rng.integers(9, VOCAB, size=int(rng.integers(lo, hi + 1))))


def _body(rng, depth, max_depth):
    out = _words(rng)
    if depth < max_depth and rng.random() < 0.8:
        n = int(rng.integers(2, 4))
        out += [TAGS.guideline] + sum(([TAGS.plan] + _words(rng) + [TAGS.plan_end] for _ in range(n)), [])
        out += [TAGS.guideline_end]
        for _ in range(n):
            out += _words(rng, 1, 1) + [TAGS.step] + _body(rng, depth + 1, max_depth) + [TAGS.step_end]
        out += _words(rng, 1, 1) + [TAGS.takeaway] + _words(rng) + [TAGS.takeaway_end] + _words(rng)
    return out


def random_trajectory(seed: int, max_depth: int = 2, prompt_id: str = "p", finish_reason: str = "stop",
                      sample_idx: int = 0) -> Trajectory:
    rng = np.random.default_rng(seed)
    prompt = _words(rng, 3, 6)
    ids = np.array(prompt + _body(rng, 0, max_depth), dtype=np.int32)
    s = parse_structure(ids, TAGS)
    sampled = np.zeros(len(ids), dtype=bool)
    sampled[len(prompt):] = rng.random(len(ids) - len(prompt)) < 0.85
    lps = np.where(sampled, -rng.random(len(ids)), np.nan).astype(np.float32)
    return Trajectory.build(token_ids=ids, positions=s.positions, segment_ids=s.segment_ids, parents=s.parents,
                            logprobs=lps, sampled=sampled, prompt_len=len(prompt), finish_reason=finish_reason,
                            prompt_id=prompt_id, sample_idx=sample_idx)


def tiny_args() -> ModelArgs:
    return ModelArgs(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, tie_word_embeddings=True)


def tiny_model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(tiny_args())
    with torch.no_grad():  # larger than HF's init so logits are far from uniform
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model
