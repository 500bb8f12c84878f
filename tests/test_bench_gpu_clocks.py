"""bench/gpu_clocks.py against a stand-in `nvidia-smi` (a real process on PATH): the field list an older
driver accepts is picked, the samples of the phase are read back after it ends, torn lines are skipped, and
without the tool the summary is empty."""
import importlib.util
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_gpu_clocks", ROOT / "bench" / "gpu_clocks.py")
gpu_clocks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_clocks)

FAKE = """#!/bin/sh
case "$*" in *clocks_event_reasons*) echo "Field is not a valid field to query." >&2; exit 2;; esac
case "$*" in *--loop-ms=*) ;; *) echo "1980, 100.00, 0x0000000000000001"; exit 0;; esac
i=0
while true; do
  if [ $((i % 2)) -eq 0 ]; then echo "1980, 600.00, 0x0000000000000000"
  else echo "1600, 700.00, 0x0000000000000004"; fi
  [ $i -eq 1 ] && echo "[N/A], [N/A], [N/A]"
  i=$((i + 1))
  sleep 0.02
done
"""


def test_samples_of_the_phase_from_a_stand_in_nvidia_smi(tmp_path, monkeypatch):
    tool = tmp_path / "nvidia-smi"
    tool.write_text(FAKE)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gpu_clocks._fields.cache_clear()  # the field list is asked once per process: ask this stand-in
    with gpu_clocks.GpuClocks(every_ms=20) as clocks:
        time.sleep(0.5)
    s = clocks.summary()
    assert s["clock_samples"] >= 4 and s["clock_samples"] == len(clocks.lines) - 1  # the [N/A] line skipped
    assert 1600 <= s["sm_mhz"] <= 1980 and s["sm_mhz_min"] == 1600
    assert 600 <= s["power_w"] <= 700
    assert s["throttle"] == ["0x0000000000000000", "0x0000000000000004"]  # the older driver's field was queried


def test_no_nvidia_smi_no_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no nvidia-smi
    with gpu_clocks.GpuClocks() as clocks:
        pass
    assert clocks.summary() == {} and clocks.proc is None
