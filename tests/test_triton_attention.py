"""Triton decode attention and KV write vs gather + SDPA (GPU only; CI skips these)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def reference(q, kc, vc, contexts):
    """Per row: gather its slots, SDPA in float32 (GQA by repeating KV heads)."""
    group = q.shape[1] // kc.shape[1]
    out = []
    for i, ctx in enumerate(contexts):
        if not ctx:
            out.append(torch.zeros_like(q[i], dtype=torch.float32))
            continue
        idx = torch.tensor(ctx, device=q.device)
        k = kc[idx].float().repeat_interleave(group, 1).transpose(0, 1)  # [Hq, L, D]
        v = vc[idx].float().repeat_interleave(group, 1).transpose(0, 1)
        o = torch.nn.functional.scaled_dot_product_attention(q[i].float()[:, None], k, v)
        out.append(o[:, 0])
    return torch.stack(out)


def random_contexts(gen, num_slots, rows, max_len, share):
    """Rows grouped into forks: each group shares a random trunk, then has its own random slots."""
    perm = torch.randperm(num_slots, generator=gen).tolist()
    out, i = [], 0
    while len(out) < rows:
        trunk = perm[i:i + int(torch.randint(0, max_len, (1,), generator=gen))]
        i += len(trunk)
        for _ in range(min(share, rows - len(out))):
            n = int(torch.randint(0, max_len - len(trunk) + 1, (1,), generator=gen))
            out.append(trunk + perm[i:i + n])
            i += n
    return out


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("rows,max_len,splits", [(1, 3000, None), (7, 700, None), (64, 300, 1),
                                                  (33, 1200, 4), (256, 400, None)])
def test_decode_matches_sdpa(rows, max_len, splits):
    from engine.triton_attention import csr, decode_attention

    gen = torch.Generator().manual_seed(rows * 1000 + max_len)
    hq, hkv, d, dev = 32, 8, 128, "cuda"
    contexts = random_contexts(gen, 200_000, rows, max_len, share=4)
    contexts[0] = contexts[0] or [5]
    kc = torch.randn(200_000, hkv, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(rows, hq, d, device=dev, dtype=torch.bfloat16)
    ref = reference(q, kc, vc, contexts)
    indptr, indices = csr(contexts, dev)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    decode_attention(q, kc, vc, indptr=indptr, indices=indices, num_splits=splits, out=out)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-2
    width = max(map(len, contexts))
    table = torch.zeros(rows, width + 3, dtype=torch.int32)
    for i, c in enumerate(contexts):
        table[i, :len(c)] = torch.tensor(c, dtype=torch.int32)
    lens = torch.tensor([len(c) for c in contexts], dtype=torch.int32, device=dev)
    out2 = decode_attention(q, kc, vc, table=table.to(dev), lens=lens, num_splits=splits)
    assert rel_err(out2, ref) < 1e-2


def test_store_kv_and_padding_rows():
    from engine.triton_attention import store_kv

    kc = torch.randn(100, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    k0, v0 = kc.clone(), vc.clone()
    k = torch.randn(5, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.tensor([3, 97, -1, 0, 50], dtype=torch.int32, device="cuda")
    store_kv(k, v, kc, vc, slots)
    keep = [i for i in range(100) if i not in (3, 97, 0, 50)]
    assert torch.equal(kc[keep], k0[keep]) and torch.equal(vc[keep], v0[keep])
    for row, s in enumerate([3, 97, None, 0, 50]):
        if s is not None:
            assert torch.equal(kc[s], k[row]) and torch.equal(vc[s], v[row])


def test_backend_matches_torch_backend():
    """TritonPagedAttention == PagedAttention on a mixed forward: decodes, a forked pair, a small extend."""
    from engine.kv_store import KVStore
    from engine.paged_attention import PagedAttention
    from engine.triton_attention import TritonPagedAttention

    torch.manual_seed(0)
    kv = KVStore(2, 4096, 8, 128, dtype=torch.bfloat16, device="cuda")
    kv.k.normal_()
    kv.v.normal_()
    trunk = list(range(100, 400))
    seqs = [(trunk + [1000], 1), (trunk + [1001], 1), (list(range(2000, 2050)) + [2050, 2051, 2052], 3),
            (list(range(3000, 3900)), 1)]
    t = sum(n for _, n in seqs)
    q = torch.randn(t, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    outs = []
    for cls in (PagedAttention, TritonPagedAttention):
        be = cls(kv)
        be.prepare(seqs)
        outs.append(be(1, q, k, v))
    assert rel_err(outs[1], outs[0]) < 1e-2


def test_graph_sample_greedy_matches_argmax():
    from engine.cuda_graphs import sample

    logits = torch.randn(4, 1000, device="cuda")
    tok, lp = sample(logits, torch.tensor([0.0, 0.0, 1.0, 0.5], device="cuda"))
    assert torch.equal(tok[:2], logits[:2].argmax(-1))
    assert torch.allclose(lp[:2], torch.log_softmax(logits[:2], -1).max(-1).values)
