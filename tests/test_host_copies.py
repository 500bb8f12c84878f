"""engine/host_copies.py: the engine loop's copies between host and GPU do not wait for work queued after them
(GPU: a read-back returns while a later kernel still runs, an upload returns while an earlier one runs, both
with the right values); on the CPU they are plain copies."""
import numpy as np
import pytest
import torch

from engine.host_copies import Readback, pinned, upload

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SPIN = 500_000_000  # GPU cycles of torch.cuda._sleep: ~0.25 s, far longer than any copy here


def test_cpu_copies_are_plain():
    a = np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]  # not contiguous: made so
    assert upload(a, torch.device("cpu")).tolist() == a.tolist()
    assert pinned(a, torch.device("cpu")).tolist() == a.tolist()
    assert Readback(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).tolist() == [[1.0, 2.0], [3.0, 4.0]]


@cuda
def test_readback_does_not_wait_for_later_work():
    x = torch.arange(6, device="cuda", dtype=torch.float64).view(2, 3)
    rb = Readback(x * 2)
    torch.cuda._sleep(SPIN)  # a step launched ahead of the host
    assert rb.tolist() == [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]
    assert not torch.cuda.current_stream().query()  # the later work still runs: the read-back did not wait for it
    torch.cuda.synchronize()


@cuda
def test_upload_returns_before_earlier_work_and_lands_in_order():
    dst = torch.zeros(4, 5, dtype=torch.int64, device="cuda")
    torch.cuda._sleep(SPIN)
    a = np.arange(20, dtype=np.int64).reshape(4, 5)
    dst.copy_(pinned(a, dst.device), non_blocking=True)
    b = upload(a * 3, dst.device)
    assert not torch.cuda.current_stream().query()  # neither copy waited for the sleep to end
    a[:] = -1  # the host array may change at once: the pinned copies hold the values
    assert dst.tolist() == np.arange(20).reshape(4, 5).tolist()
    assert b.tolist() == (np.arange(20).reshape(4, 5) * 3).tolist()
