"""The torch KV-slot backend equals dense masked attention over the same tokens (issue 3, deliverable 8)."""
import torch
from hypothesis import given, settings, strategies as st

from engine.attention import sdpa
from engine.kv_store import KVStore
from engine.paged_attention import MAX_GROUP_SLOTS, PagedAttention, _group_by_length


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


def brute_force(q, kc, vc, seqs):
    """Each new token attends to its context slots up to itself: a float64 softmax per query."""
    group = q.shape[1] // kc.shape[1]
    out, row = [], 0
    for ctx, n in seqs:
        for j in range(n):
            vis = torch.tensor(ctx[:len(ctx) - n + j + 1])
            k = kc[vis].double().repeat_interleave(group, 1)  # [L, Hq, D]
            v = vc[vis].double().repeat_interleave(group, 1)
            w = torch.softmax(torch.einsum("hd,lhd->hl", q[row + j].double(), k) / q.shape[-1] ** 0.5, -1)
            out.append(torch.einsum("hl,lhd->hd", w, v))
        row += n
    return torch.stack(out)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 30)), min_size=1, max_size=12), st.randoms())
def test_batched_extends_and_decodes_equal_brute_force(shapes, rnd):
    """Prompts and extends of any lengths after any cached prefix, decodes among them, in any order, in one
    forward: grouped into padded SDPA calls, every token's output is its own softmax over its visible slots."""
    g = torch.Generator().manual_seed(rnd.randrange(1 << 30))
    hq, hkv, d = 4, 2, 8
    total = sum(p + n for p, n in shapes)
    kv = KVStore(num_layers=1, num_slots=total + 1, num_kv_heads=hkv, head_dim=d)
    slots = torch.randperm(total, generator=g).tolist()  # contexts scattered over the pool
    kv.k[0].copy_(torch.randn(kv.k[0].shape, generator=g))
    kv.v[0].copy_(torch.randn(kv.v[0].shape, generator=g))
    seqs = []
    for p, n in shapes:
        seqs.append((slots[:p + n], n))
        slots = slots[p + n:]
    tokens = sum(n for _, n in seqs)
    q = torch.randn(tokens, hq, d, generator=g)
    k = torch.randn(tokens, hkv, d, generator=g)
    v = torch.randn(tokens, hkv, d, generator=g)
    attn = PagedAttention(kv)
    attn.prepare(seqs)
    out = attn(0, q, k, v)
    ref = brute_force(q, kv.k[0], kv.v[0], seqs)  # the call wrote the new tokens' k/v into their slots
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@given(st.lists(st.integers(1, 40000), max_size=60))
def test_extend_groups_cover_each_extend_once_and_bound_the_padding(lengths):
    extends = [(i, 2, range(n)) for i, n in enumerate(lengths)]  # only the lengths matter
    groups = _group_by_length(extends)
    assert sorted(e[0] for grp in groups for e in grp) == list(range(len(lengths)))
    for grp in groups:
        longest, real = max(len(e[2]) for e in grp), sum(len(e[2]) for e in grp)
        assert len(grp) * longest <= 2 * real
        assert len(grp) == 1 or len(grp) * longest <= MAX_GROUP_SLOTS
