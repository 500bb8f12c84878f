"""SM clock, power and throttle reasons of GPU 0 while a measured phase runs, sampled by `nvidia-smi` in the
background: whether a slower phase ran at lower clocks (power or thermal limits under sustained load) or did
more work. Without `nvidia-smi` (or on a CPU) the summary is empty and nothing else changes.

    with GpuClocks() as clocks:
        ...            # the phase, synchronised at its end
    row.update(clocks.summary())   # {"sm_mhz": mean, "sm_mhz_min": ..., "power_w": mean, "throttle": [...]}
"""
from __future__ import annotations

import functools
import shutil
import subprocess

QUERIES = ("clocks.sm,power.draw,clocks_event_reasons.active",  # newer drivers' name
           "clocks.sm,power.draw,clocks_throttle_reasons.active", "clocks.sm,power.draw")


@functools.cache
def _fields(gpu: int) -> str | None:
    """The first field list this driver's nvidia-smi accepts (queried once per process, before any phase)."""
    for q in QUERIES:
        if subprocess.run(["nvidia-smi", f"--id={gpu}", f"--query-gpu={q}", "--format=csv,noheader"],
                          check=False, capture_output=True, timeout=10).returncode == 0:
            return q
    return None


class GpuClocks:
    def __init__(self, every_ms: int = 50, gpu: int = 0):
        self.every_ms, self.gpu = every_ms, gpu
        self.proc, self.lines = None, []

    def __enter__(self) -> "GpuClocks":
        q = _fields(self.gpu) if shutil.which("nvidia-smi") else None
        if q is not None:
            self.proc = subprocess.Popen(["nvidia-smi", f"--id={self.gpu}", f"--query-gpu={q}",
                                          "--format=csv,noheader,nounits", f"--loop-ms={self.every_ms}"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.lines = [ln for ln in out.splitlines() if ln.strip()]

    def summary(self) -> dict:
        """Mean and minimum SM clock (MHz), mean power (W), and the throttle-reason masks seen (hex strings;
        0x1 idle, 0x4 software power cap, 0x8 hardware slowdown, 0x20 / 0x40 thermal slowdown; `nvidia-smi -q
        -d PERFORMANCE` names them)."""
        mhz, watts, reasons = [], [], set()
        for ln in self.lines:
            parts = [p.strip() for p in ln.split(",")]
            try:
                mhz.append(float(parts[0]))
                watts.append(float(parts[1]))
            except (ValueError, IndexError):  # "[N/A]" or a torn last line
                continue
            if len(parts) > 2:
                reasons.add(parts[2])
        if not mhz:
            return {}
        return {"sm_mhz": round(sum(mhz) / len(mhz)), "sm_mhz_min": round(min(mhz)),
                "power_w": round(sum(watts) / len(watts)), "throttle": sorted(reasons), "clock_samples": len(mhz)}
