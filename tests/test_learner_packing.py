"""Tree packing: predecessors, masks, bin packing, the flex mask_mod, and packed logprobs vs HF per sample."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from engine.attention import MaskedAttention
from npr_async.structure import visibility_mask
from npr_async.training.packing import Sample, collate, pack, predecessors
from npr_async.training.trainer import score_samples
from tests.learner_trees import random_trajectory, tiny_args, tiny_model


def brute_predecessor(mask: np.ndarray) -> np.ndarray:
    """max visible index < j, straight from the visibility matrix (-1: none)."""
    out = []
    for j in range(len(mask)):
        seen = np.flatnonzero(mask[j, :j])
        out.append(seen.max() if len(seen) else -1)
    return np.array(out)


@pytest.mark.parametrize("seed", range(12))
def test_predecessors_match_visibility(seed):
    t = random_trajectory(seed, max_depth=3)
    mask = visibility_mask(t.segs(), t.parents())
    np.testing.assert_array_equal(predecessors(t.segs(), t.parents()), brute_predecessor(mask))


def test_predecessor_of_a_step_is_the_fork_point():
    # seg 0 = prompt..</guideline> (0..3), step 1 (4..5), step 2 (6..7), join (8..9)
    segs = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
    parents = [[], [0], [0], [0, 1, 2]]
    np.testing.assert_array_equal(predecessors(segs, parents), [-1, 0, 1, 2, 3, 4, 3, 6, 7, 8])


def test_collated_mask_is_block_diagonal_visibility():
    trajs = [random_trajectory(s) for s in range(4)]
    mb = collate([Sample.from_trajectory(t) for t in trajs])
    want = np.zeros((mb.num_tokens, mb.num_tokens), dtype=bool)
    for t, (a, b) in zip(trajs, mb.bounds):
        want[a:b, a:b] = visibility_mask(t.segs(), t.parents())
    np.testing.assert_array_equal(mb.dense_mask().numpy(), want)
    np.testing.assert_array_equal(mb.positions.numpy(), np.concatenate([t.pos() for t in trajs]))
    # targets are exactly the sampled tokens, each scored at its own sample's predecessor
    sampled = np.concatenate([t.sampled_mask() for t in trajs])
    np.testing.assert_array_equal(mb.target_index.numpy(), np.flatnonzero(sampled))
    assert (mb.pred_index < mb.target_index).all()
    assert (mb.sample_index[mb.pred_index] == mb.sample_index[mb.target_index]).all()


def test_first_fit_decreasing():
    def sample(n):
        return Sample(np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32), [[]],
                      np.r_[False, np.ones(n - 1, bool)])

    sizes = [5, 4, 3, 3, 2, 1, 9]
    mbs = pack([sample(n) for n in sizes], max_tokens=8)
    # FFD: 9 alone (oversize), 5+3, 4+3+1, 2
    assert sorted(sorted(len(s) for s in mb.samples) for mb in mbs) == [[1, 3, 4], [2], [3, 5], [9]]
    assert sum(mb.num_tokens for mb in mbs) == sum(sizes)  # no padding


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_mask_mod_and_forward_match_dense():
    from torch.nn.attention.flex_attention import create_mask

    from npr_async.training.flex import FlexAttention, build_block_mask, visibility_mask_mod

    mb = collate([Sample.from_trajectory(random_trajectory(s)) for s in (5, 6, 7)])
    t = mb.num_tokens
    dense = create_mask(visibility_mask_mod(mb.segment_ids, mb.ancestors), None, None, t, t, device="cpu")
    torch.testing.assert_close(dense[0, 0], mb.dense_mask(), rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(t, 4, 16, generator=g), torch.randn(t, 2, 16, generator=g), torch.randn(t, 2, 16, generator=g)
    flex = FlexAttention(build_block_mask(mb.segment_ids, mb.ancestors, block_size=16), compiled=False)
    torch.testing.assert_close(flex(0, q, k, v), MaskedAttention(mb.dense_mask())(0, q, k, v), rtol=1e-5, atol=1e-5)


def hf_twin(model):
    a = tiny_args()
    cfg = transformers.Qwen3Config(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                                   num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
                                   num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps,
                                   tie_word_embeddings=True, attn_implementation="sdpa",
                                   rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta})
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf


def test_packed_logprobs_equal_hf_per_sample():
    model = tiny_model(0).eval()
    hf = hf_twin(model)
    trajs = [random_trajectory(s, max_depth=3) for s in range(10, 16)]
    ours = score_samples(model, [Sample.from_trajectory(t) for t in trajs], max_tokens=160)
    for t, got in zip(trajs, ours):
        mask = torch.from_numpy(visibility_mask(t.segs(), t.parents()))
        ids = torch.tensor(t.ids(), dtype=torch.long)
        with torch.no_grad():
            logits = hf(input_ids=ids[None], position_ids=torch.tensor(t.pos(), dtype=torch.long)[None],
                        attention_mask=mask[None, None]).logits[0].float()
        pred = brute_predecessor(mask.numpy())
        sel = np.flatnonzero(t.sampled_mask())
        want = torch.log_softmax(logits[pred[sel]], -1).gather(-1, ids[sel][:, None])[:, 0].numpy()
        np.testing.assert_allclose(got[sel], want, rtol=0, atol=1e-5)
        assert np.isnan(np.delete(got, sel)).all()
