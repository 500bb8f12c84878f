"""The torch KV-slot backend equals dense masked attention over the same tokens (issue 3, deliverable 8)."""
import torch

from engine.attention import sdpa
from engine.kv_store import KVStore
from engine.paged_attention import PagedAttention


def test_paged_equals_dense_over_forked_contexts():
    g = torch.Generator().manual_seed(0)
    hq, hkv, d = 4, 2, 8
    kv = KVStore(num_layers=1, num_slots=64, num_kv_heads=hkv, head_dim=d)
    trunk = [kv.new_segment()]
    kv.extend(trunk[0], 6)
    # a prefill of the trunk (6 tokens) and, in the same forward, two children extending it (3 and 1 tokens)
    kids = kv.fork(trunk, 2)
    kv.extend(kids[0][-1], 3)
    kv.extend(kids[1][-1], 1)
    seqs = [(kv.context_slots(trunk), 6), (kv.context_slots(kids[0]), 3), (kv.context_slots(kids[1]), 1)]
    # the same thing densely: 10 tokens, children see the trunk and themselves (causally), not each other
    seg = torch.tensor([0] * 6 + [1] * 3 + [2])
    idx = torch.arange(10)
    causal = idx[:, None] >= idx[None, :]
    mask = ((seg[:, None] == seg[None, :]) & causal) | ((seg[None, :] == 0) & (seg[:, None] > 0))
    q = torch.randn(10, hq, d, generator=g)
    k = torch.randn(10, hkv, d, generator=g)
    v = torch.randn(10, hkv, d, generator=g)
    attn = PagedAttention(kv)
    attn.prepare(seqs)
    out = attn(0, q, k, v)
    ref = sdpa(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # a later decode forward of child 1 reads the cached trunk and child-1 slots
    kv.extend(kids[1][-1], 1)
    q2, k2, v2 = (torch.randn(1, h, d, generator=g) for h in (hq, hkv, hkv))
    attn.prepare([(kv.context_slots(kids[1]), 1)])
    out2 = attn(0, q2, k2, v2)
    sel = [0, 1, 2, 3, 4, 5, 9]
    ref2 = sdpa(q2, torch.cat([k[sel], k2]), torch.cat([v[sel], v2]), None)
    torch.testing.assert_close(out2, ref2, atol=1e-5, rtol=1e-5)
