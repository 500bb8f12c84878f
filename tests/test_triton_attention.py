"""Triton decode attention and KV write vs gather + SDPA (GPU only; CI skips these)."""
from __future__ import annotations

import numpy as np
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
    # rows: each query row reads another row of a larger table (the engine's per-branch table rows)
    perm = torch.randperm(rows + 5, generator=gen)[:rows]
    big = torch.zeros(rows + 5, width + 3, dtype=torch.int32)
    big[perm] = table
    out3 = decode_attention(q, kc, vc, table=big.to(dev), lens=lens, rows=perm.to(dev, torch.int32), num_splits=splits)
    assert torch.equal(out3, out2)


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


@pytest.mark.parametrize("splits", [1, 2, 16])
def test_fused_kv_write_matches_store_then_attend(splits):
    """decode_attention(new_kv=...) == store_kv + decode_attention: same cache contents, same output; padding
    rows (slot -1) write nothing; the split-merge counters are left re-armed (all zero)."""
    from engine.triton_attention import decode_attention, store_kv
    from engine.triton_gemm import arrival_counters

    gen = torch.Generator().manual_seed(splits)
    hq, hkv, d, rows = 32, 8, 128, 6
    kc = torch.randn(5000, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    vc = torch.randn(5000, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    lens = torch.tensor([300, 1, 0, 77, 1, 129], dtype=torch.int32)
    slots = torch.tensor([4000, 4001, -1, 4002, -1, 4003], dtype=torch.int32)
    table = torch.randint(0, 3900, (rows, 320), generator=gen, dtype=torch.int32)
    for r in range(rows):
        if lens[r] > 0 and slots[r] >= 0:
            table[r, lens[r] - 1] = slots[r]
    q, k, v = (torch.randn(rows, h, d, generator=gen).to("cuda", torch.bfloat16) for h in (hq, hkv, hkv))
    table, lens, slots = table.cuda(), lens.cuda(), slots.cuda()
    ref_k, ref_v = kc.clone(), vc.clone()
    store_kv(k, v, ref_k, ref_v, slots)
    ref = decode_attention(q, ref_k, ref_v, table=table, lens=lens, num_splits=splits)
    out = decode_attention(q, kc, vc, table=table, lens=lens, new_kv=(k, v, slots), num_splits=splits)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    real = torch.tensor([0, 1, 2, 3, 5])  # row 4: its new token (slot -1) is k[4], the unfused path reads table[4, 0]
    assert rel_err(out[real], ref[real]) < 1e-2
    assert not out.isnan().any()
    assert int(arrival_counters(q.device, rows * hkv)[:rows * hkv].abs().sum()) == 0


@pytest.mark.parametrize("splits,norm,inside", [(1, True, True), (4, True, True), (2, False, True), (1, True, False),
                                               (2, False, False)])
def test_fused_qk_norm_rope_matches_rotating_first(monkeypatch, splits, norm, inside, dev="cuda"):
    """decode_attention(qk_norm_rope=...) on projected q / k == the q/k-norm + RoPE kernel, then decode_attention:
    the same cache contents (the rotated k written) and the same output, whether the launch rotates them
    itself or has the q/k kernel do it first (`rotates_inside`); bad arguments are refused."""
    from engine import triton_attention
    from engine.triton_attention import decode_attention
    from engine.triton_qk_rope import qk_norm_rope_cuda

    monkeypatch.setattr(triton_attention, "rotates_inside", lambda rows, hkv: inside)

    gen = torch.Generator().manual_seed(7 + splits)
    hq, hkv, d, rows = 32, 8, 128, 5
    kc = torch.randn(3000, hkv, d, generator=gen).to(dev, torch.bfloat16)
    vc = torch.randn(3000, hkv, d, generator=gen).to(dev, torch.bfloat16)
    lens = torch.tensor([40, 1, 0, 77, 9], dtype=torch.int32)
    slots = torch.tensor([2900, 2901, -1, 2902, -1], dtype=torch.int32)
    table = torch.randint(0, 2800, (rows, 80), generator=gen, dtype=torch.int32)
    for r in range(rows):
        if lens[r] > 0 and slots[r] >= 0:
            table[r, lens[r] - 1] = slots[r]
    qk = (3 * torch.randn(rows, hq + hkv, d, generator=gen)).to(dev, torch.bfloat16)
    v = torch.randn(rows, hkv, d, generator=gen).to(dev, torch.bfloat16)
    ang = torch.rand(rows, d // 2, generator=gen) * 100
    cos, sin = (torch.cat([f(ang), f(ang)], -1).to(dev, torch.bfloat16) for f in (torch.cos, torch.sin))
    wq, wk = ((1 + torch.randn(d, generator=gen) / 4).to(dev, torch.bfloat16) for _ in range(2))
    weights = (wq, wk) if norm else (None, None)
    table, lens, slots = table.to(dev), lens.to(dev), slots.to(dev)
    ref_k, ref_v = kc.clone(), vc.clone()
    rot = qk_norm_rope_cuda(qk, *weights, hq, 1e-6, cos[:, None], sin[:, None])
    ref = decode_attention(rot[:, :hq], ref_k, ref_v, table=table, lens=lens, new_kv=(rot[:, hq:], v, slots),
                           num_splits=splits)
    q, k = qk[:, :hq], qk[:, hq:]  # views of one [T, Hq + Hkv, D] tensor, as the fused q/k/v projection gives them
    out = decode_attention(q, kc, vc, table=table, lens=lens, new_kv=(k, v, slots), num_splits=splits,
                           qk_norm_rope=(*weights, 1e-6, cos, sin))
    # The same arithmetic on the same bf16 q and k, only where it happens differs; but the RMSNorm's float32 sum
    # runs in each kernel's register layout, so a last-bit rstd difference may flip a rare bf16 rounding (session
    # 10, H200: 1 of 5 cases not bit-equal). A swapped or misplaced half is off by ~1.
    written = slots[slots >= 0].long()
    untouched = torch.ones(len(kc), dtype=torch.bool, device=dev)
    untouched[written] = False
    assert torch.equal(kc[untouched], ref_k[untouched]) and torch.equal(vc, ref_v)
    assert rel_err(kc[written], ref_k[written]) < 2e-3 and rel_err(out, ref) < 2e-3
    for bad in [(wq, None, 1e-6, cos, sin), (*weights, 1e-6, cos[:, :64], sin), (*weights, 1e-6, cos[:4], sin[:4])]:
        with pytest.raises(ValueError, match="qk_norm_rope"):
            decode_attention(q, kc, vc, table=table, lens=lens, new_kv=(k, v, slots), qk_norm_rope=bad)
    with pytest.raises(ValueError, match="qk_norm_rope needs new_kv"):
        decode_attention(q, kc, vc, table=table, lens=lens, qk_norm_rope=(*weights, 1e-6, cos, sin))


@pytest.mark.parametrize("dtype,hq", [(torch.bfloat16, 32), (torch.float32, 32), (torch.bfloat16, 16)])
def test_fork_kernel_matches_per_row_kernel(dtype, hq, dev="cuda"):
    """fork_decode_attention over groups of rows sharing a trunk == decode_attention row by row: the same output
    (one online softmax per query vector, the trunk's tiles in another order) and the same cache writes. Groups
    of every size up to the limit, trunks of 0 to a row's whole context but its new token, a group whose rows
    reach past the launch, padding rows (slot -1, no context); bad arguments are refused."""
    from engine.slot_decode import rows_per_group
    from engine.triton_attention import decode_attention
    from engine.triton_fork_attention import fork_decode_attention

    gen = torch.Generator().manual_seed(11)
    hkv, d = 8, 128
    limit = rows_per_group(hq, hkv)
    kc0 = torch.randn(6000, hkv, d, generator=gen).to(dev, dtype)
    vc0 = torch.randn(6000, hkv, d, generator=gen).to(dev, dtype)
    perm = torch.randperm(5000, generator=gen).tolist()
    sizes, trunk_lens = [1, limit, 2, 3, limit, 1, 2], [0, 130, 64, 1, 300, 77, 0]
    contexts, starts, trunks, new = [], [], [], 5000
    for size, t in zip(sizes, trunk_lens):
        trunk = [perm.pop() for _ in range(t)]
        starts.append(len(contexts))
        trunks.append(t)
        for _ in range(size):
            own = [perm.pop() for _ in range(int(torch.randint(0, 90, (1,), generator=gen)))]
            contexts.append(trunk + own + [new])  # the new token last
            new += 1
    real = len(contexts)
    rows = real + 3  # three padding rows: groups of their own
    starts += list(range(real, real + 3)) + [rows + 5] * (rows + 1 - len(starts) - 3)
    trunks += [0] * (rows - len(trunks))
    table = torch.zeros(2 * rows, 512, dtype=torch.int32)
    lens = torch.zeros(rows, dtype=torch.int32)
    row_of = torch.randperm(2 * rows, generator=gen)[:rows].int()  # table rows, as the graphs keep them
    for r, c in enumerate(contexts):
        table[row_of[r], :len(c)] = torch.tensor(c, dtype=torch.int32)
        lens[r] = len(c)
    slots = torch.tensor([c[-1] for c in contexts] + [-1] * 3, dtype=torch.int32)
    q = torch.randn(rows, hq, d, generator=gen).to(dev, dtype)
    k = torch.randn(rows, hkv, d, generator=gen).to(dev, dtype)
    v = torch.randn(rows, hkv, d, generator=gen).to(dev, dtype)
    table, lens, row_of, slots = table.to(dev), lens.to(dev), row_of.to(dev), slots.to(dev)
    st, tr = torch.tensor(starts, dtype=torch.int32, device=dev), torch.tensor(trunks, dtype=torch.int32, device=dev)
    outs, caches = [], []
    for fork in (False, True):
        kc, vc = kc0.clone(), vc0.clone()
        kw = dict(table=table, lens=lens, rows=row_of, new_kv=(k, v, slots))
        out = (fork_decode_attention(q, kc, vc, starts=st, trunks=tr, **kw) if fork else
               decode_attention(q, kc, vc, num_splits=1, **kw))
        outs.append(out[:real])
        caches.append((kc, vc))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert rel_err(outs[1], outs[0]) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert not outs[1].isnan().any()
    with pytest.raises(ValueError, match="starts need R"):
        fork_decode_attention(q, kc, vc, starts=st[:rows], trunks=tr, table=table, lens=lens, rows=row_of,
                              new_kv=(k, v, slots))


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


@pytest.mark.parametrize("compile", [False, True])
def test_decode_graph_sampling(compile):
    """sample=True graphs (the bench's direct path), the sampler compiled with the step or not: greedy rows take
    the argmax of the graph's logits, hot rows draw fresh tokens each replay, logprobs are the T law's."""
    from engine.cuda_graphs import DecodeGraphs
    from engine.kv_store import KVStore

    model = tiny_model()
    kv = KVStore(2, 600, 2, 16, dtype=torch.float32, device="cuda")
    g = DecodeGraphs(model, kv.k, kv.v, max_context=64, buckets=(1, 4, 8), compile=compile)
    g.capture()
    g.table[:4, :10] = torch.arange(40, device="cuda", dtype=torch.int32).view(4, 10)
    g.ids[:4] = torch.tensor([5, 6, 7, 8])
    g.pos[:4], g.lens[:4], g.slots[:4] = 9, 10, g.table[:4, 9].long()
    g.temperature[:4] = torch.tensor([0.0, 0.0, 30.0, 100.0])  # hot: flat laws (the model is peaked)
    draws = []
    for _ in range(20):
        logits = g.logits[g.replay(4)][:4].float()
        tok, lp = g.tokens[:4].clone(), g.logprobs[:4].clone()
        assert torch.equal(tok[:2], logits[:2].argmax(-1))
        t = torch.tensor([1.0, 1.0, 30.0, 100.0], device="cuda")[:, None]
        torch.testing.assert_close(lp, (logits / t).log_softmax(-1).gather(1, tok[:, None])[:, 0], rtol=1e-4, atol=1e-4)
        draws.append(tok[2:].tolist())
    assert len({tuple(d) for d in draws}) > 5


def tiny_model():
    from engine.model import CausalLM, ModelArgs

    cfg = dict(model_type="qwen3", vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
               max_position_embeddings=1024)
    torch.manual_seed(0)
    return CausalLM(ModelArgs.from_hf_config(cfg)).cuda().eval()


@torch.inference_mode()
def test_decode_graph_logits_match_eager_torch_backend():
    from engine.cuda_graphs import DecodeGraphs
    from engine.kv_store import KVStore
    from engine.paged_attention import PagedAttention

    model = tiny_model()
    kv = KVStore(2, 600, 2, 16, dtype=torch.float32, device="cuda")
    kv.k.normal_()
    kv.v.normal_()
    trunk = list(range(10, 90))
    contexts = [trunk + [100], trunk + [101], trunk + [102], list(range(200, 230))]  # a 3-way fork + one more
    ids, pos = [5, 6, 7, 8], [80, 80, 80, 29]
    be = PagedAttention(kv)
    be.prepare([(c, 1) for c in contexts])
    ref = model.compute_logits(model(torch.tensor(ids, device="cuda"), torch.tensor(pos, device="cuda"), be))
    g = DecodeGraphs(model, kv.k, kv.v, max_context=128, buckets=(1, 2, 8), sample=False)
    g.capture()
    for n in (4, 1):  # bucket 8 with 4 padding rows, then bucket 1
        out = g.run(ids[:n], pos[:n], contexts[:n])
        assert out.shape == (n, 500)
        torch.testing.assert_close(out, ref[:n], rtol=1e-4, atol=1e-4)


def forked_greedy_workload(tmp_path):
    """A tiny model dir and greedy prompts that fork at once, resume inside a step, and run sequentially."""
    from engine import SamplingParams
    from npr_async.models import init_model

    d = init_model("tiny", str(tmp_path / "m"), seed=0)
    q = "Question: add 17 and 25.\n<guideline>" + "".join(f"<plan>{k}: way {k}</plan>" for k in (1, 2, 3))
    prompts = [q + "</guideline>", q + "</guideline>\n<step>\n1: partial", "Question: add 1 and 2.\n"]
    p = SamplingParams(temperature=0.0, seed=1, repetition_penalty=1.0, branch_repetition_penalty=1.0,
                       max_total_tokens=120, max_path_tokens=90, max_step_tokens=12, max_plans=5)
    return d, prompts, p


def test_llm_triton_backend_matches_torch_backend(tmp_path):
    """The engine end to end on the GPU: forked greedy trajectories are the same with both backends."""
    from engine import LLM
    from npr_async.config import EngineConfig

    d, prompts, p = forked_greedy_workload(tmp_path)
    runs = []
    for backend in ("torch", "triton"):
        llm = LLM(d, config=EngineConfig(kv_slots=4096, max_batch_tokens=512, attention_backend=backend),
                  device="cuda")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # peaked distributions, so greedy choices are not near ties
            named = [(n, (1 + 0.2 * torch.randn(t.shape, generator=g)) if "norm" in n else
                      0.15 * torch.randn(t.shape, generator=g)) for n, t in llm.model.state_dict().items()]
        llm.update_weights(named, version=1)
        runs.append(llm.generate(prompts, p))
    for a, b in zip(*runs):
        assert a.ids().tolist() == b.ids().tolist() and a.finish_reason == b.finish_reason
        la, lb = (torch.from_numpy(np.frombuffer(t.logprobs, dtype=np.float32).copy()) for t in (a, b))
        torch.testing.assert_close(la, lb, rtol=1e-3, atol=1e-3, equal_nan=True)


@pytest.mark.parametrize("dtype,ahead,fork", [(torch.float32, False, False), (torch.bfloat16, False, False),
                                               (torch.float32, True, False), (torch.float32, False, True)])
def test_llm_cuda_graphs_match_eager(tmp_path, monkeypatch, dtype, ahead, fork):
    """EngineConfig.cuda_graphs: decode-only steps replay DecodeGraphs (fused projections, bucketed batch
    sizes, padding rows); trajectories equal the eager loop's (same Triton kernel), logprobs within tolerance.
    ahead: with the engine loop's step ahead (`llm.STEP_AHEAD`: ids fed on the device, asynchronous); fork:
    every bucket's attention through the fork-group kernel (`cuda_graphs.FORK_GROUPS_FROM`)."""
    import engine.cuda_graphs as cg
    import engine.llm as llm_mod
    from engine import LLM
    from npr_async.config import EngineConfig

    monkeypatch.setattr(llm_mod, "STEP_AHEAD", ahead)
    if fork:
        monkeypatch.setattr(cg, "FORK_GROUPS_FROM", 1)
    d, prompts, p = forked_greedy_workload(tmp_path)
    runs = []
    for graphs in (False, True):
        llm = LLM(d, config=EngineConfig(kv_slots=4096, max_batch_tokens=512, attention_backend="triton",
                                         cuda_graphs=graphs), device="cuda", dtype=dtype)
        assert llm.model.fused
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # peaked distributions, so greedy choices are not near ties
            named = [(n, (1 + 0.2 * torch.randn(t.shape, generator=g)) if "norm" in n else
                      0.15 * torch.randn(t.shape, generator=g)) for n, t in llm.weight_targets().items()]
        llm.update_weights(named, version=1)  # in place, by HF name: the captured graphs see it
        runs.append(llm.generate(prompts, p))
        if graphs:
            assert llm.last_stats["graph_steps"] > 0.5 * llm.last_stats["forwards"], llm.last_stats
            assert (llm.last_stats["steps_ahead"] > 0) == ahead, llm.last_stats
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for a, b in zip(*runs):
        ia, ib = a.ids().tolist(), b.ids().tolist()
        if dtype == torch.float32:
            assert ia == ib and a.finish_reason == b.finish_reason
        # bf16: GEMMs of another batch shape may round differently; compare up to a first divergence
        n = next((i for i, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
        assert n >= min(len(ia), len(ib), a.prompt_len + 16)
        torch.testing.assert_close(torch.tensor(a.lps()[:n]), torch.tensor(b.lps()[:n]), rtol=tol, atol=tol,
                                   equal_nan=True)


@pytest.mark.parametrize("ahead", [False, True])
def test_llm_loop_never_syncs_but_for_its_read_back(tmp_path, monkeypatch, ahead):
    """Issue 8: no host synchronisation in the decode loop beyond the one per step the state machine needs (the
    step's tokens, read through an event: engine/host_copies.py, not counted by torch's sync debug mode). After
    the first call (graph capture, GEMM tuning and compiles sync), a whole generate call (prompt chunks, forks,
    joins, graph steps, steps ahead) runs with torch's sync debug mode set to raise at any synchronising op: a
    blocking copy, `.item()`, a boolean index."""
    import engine.llm as llm_mod
    from engine import LLM
    from npr_async.config import EngineConfig

    monkeypatch.setattr(llm_mod, "STEP_AHEAD", ahead)
    d, prompts, p = forked_greedy_workload(tmp_path)
    llm = LLM(d, config=EngineConfig(kv_slots=4096, max_batch_tokens=512, attention_backend="triton",
                                     cuda_graphs=True), device="cuda")
    first = llm.generate(prompts, p)
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = llm.generate(prompts, p)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert llm.last_stats["graph_steps"] > 0 and (llm.last_stats["steps_ahead"] > 0) == ahead
    assert [t.ids().tolist() for t in again] == [t.ids().tolist() for t in first]  # greedy: the same work
