"""BusyClock: the device's time on bracketed work. On the CPU, wall-clock spans; on a GPU (skipped here), the
time the device ran asynchronously enqueued work, checked against a synchronised measurement of it."""
import time

import pytest
import torch

from npr_async.training.busy_clock import BusyClock


def test_cpu_spans_add_up_and_the_gaps_do_not_count():
    clock = BusyClock("cpu")
    for _ in range(3):
        with clock:
            time.sleep(0.03)
        time.sleep(0.05)  # waiting between spans: not busy
    assert 0.09 <= clock.seconds() < 0.09 + 0.05
    assert clock.seconds() == clock.seconds()  # reading does not reset


def test_a_span_closes_when_its_work_raises_and_misuse_is_refused():
    clock = BusyClock("cpu")
    with pytest.raises(ValueError, match="bad group"):
        with clock:
            time.sleep(0.01)
            raise ValueError("bad group")
    assert clock.seconds() >= 0.01
    clock.start()
    with pytest.raises(RuntimeError, match="still open"):
        clock.start()
    clock.stop()
    with pytest.raises(RuntimeError, match="without start"):
        clock.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_counts_work_that_runs_on_after_the_host_returns():
    a = torch.randn(4096, 4096, device="cuda")
    a @ a  # cuBLAS's first call (handle, heuristics) stays out of the reference
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        a @ a
    torch.cuda.synchronize()
    reference = time.perf_counter() - t0  # the same work, timed with a synchronisation
    clock = BusyClock("cuda")
    host = time.perf_counter()
    with clock:
        for _ in range(50):
            a @ a
    host = time.perf_counter() - host  # the enqueue alone
    time.sleep(2 * reference)  # the host waits; the GPU finishes meanwhile
    busy = clock.seconds()
    assert host < 0.5 * busy
    assert busy == pytest.approx(reference, rel=0.25)
