"""engine/l2_prefetch.py on the GPU: the side-stream prefetch changes no value, joins cleanly (also inside a
CUDA-graph capture, where the fork and the join become graph edges), honours its byte budget, refuses
tensors it cannot address. The engine's decode graphs (prefetching by default) are checked against eager
forwards in tests/test_triton_attention.py."""
import pytest
import torch
import torch.nn.functional as F

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_prefetch_changes_nothing_and_joins():
    from engine import l2_prefetch

    w = torch.randn(4096, 2560, device="cuda").bfloat16()
    before = w.clone()
    l2_prefetch.prefetch([w, w[:100]], budget=w.numel() * 2 + 4096)  # the second tensor cut by the budget
    l2_prefetch.join(w.device)
    torch.cuda.synchronize()
    assert torch.equal(w, before)
    assert not l2_prefetch._PENDING
    l2_prefetch.prefetch([w], budget=0)  # off: nothing issued, nothing to join
    assert not l2_prefetch._PENDING
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch.prefetch([w.t()], budget=1 << 20)


@cuda
def test_prefetch_inside_a_cuda_graph():
    from engine import l2_prefetch

    x = torch.randn(64, 4096, device="cuda").bfloat16()
    ws = [torch.randn(2560, 4096, device="cuda").bfloat16() / 64 for _ in range(3)]

    def step():
        outs = []
        for i, w in enumerate(ws):
            if i + 1 < len(ws):
                l2_prefetch.prefetch([ws[i + 1]], budget=32 << 20)  # the next product's weights
            outs.append(F.linear(x, w))
        l2_prefetch.join(x.device)
        return outs

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    for _ in range(2):
        x.normal_()
        g.replay()
        torch.cuda.synchronize()
        for o, w in zip(outs, ws):
            torch.testing.assert_close(o, F.linear(x, w), rtol=0, atol=1e-2)
