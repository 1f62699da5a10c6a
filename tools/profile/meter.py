"""Memory meters: what "used memory" means on each kind of machine, read honestly.

    meter = open_meter(device)      # CpuMeter, CudaMeter or JetsonMeter
    meter.reset_peak(); ...work...; meter.peak() - base

CpuMeter     this process's resident set: VmRSS, and its high-water mark VmHWM, which
             Linux resets when "5" is written to /proc/self/clear_refs. Where that file
             is not writable, a 1 ms sampling thread stands in (it can miss a short spike).
CudaMeter    torch.cuda's caching allocator: memory_allocated / max_memory_allocated
             (live tensors) and memory_reserved / max_memory_reserved (what the allocator
             holds from the driver; the difference is allocator overhead). Host memory
             is read beside it with a CpuMeter.
JetsonMeter  Jetson's CPU and GPU share DRAM: the whole system's used memory,
             MemTotal - MemAvailable from /proc/meminfo, sampled every 2 ms by a thread
             (what tegrastats reports as RAM), next to the CUDA allocator's own figures.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")
_MEMINFO = Path("/proc/meminfo")


def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"{_STATUS} has no {field}: cannot measure memory on this system")
    return int(m.group(1)) * 1024


def rss() -> int:
    """Resident set size of this process, bytes."""
    return _status_kib("VmRSS")


def rss_parts() -> dict[str, int]:
    """VmRSS split: anonymous (heap, tensors, JIT code), file-backed (library code, shared
    with other processes and reclaimable), shared memory."""
    text = _STATUS.read_text()
    return {k: int(m.group(1)) * 1024 for k in ("RssAnon", "RssFile", "RssShmem")
            if (m := re.search(rf"^{k}:\s+(\d+) kB", text, re.M))}


def meminfo() -> dict[str, int]:
    out = {}
    for line in _MEMINFO.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def is_jetson() -> bool:
    """An NVIDIA Jetson (Tegra SoC: CPU and GPU share memory)."""
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        return "jetson" in Path("/proc/device-tree/model").read_text(errors="ignore").lower()
    except OSError:
        return False


class _Sampler:
    """Polls a reading in a thread and keeps its maximum."""

    def __init__(self, read, period_s: float):
        self.read, self.period = read, period_s
        self.max = read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            v = self.read()
            if v > self.max:
                self.max = v
            time.sleep(self.period)

    def reset(self) -> None:
        self.max = self.read()

    def value(self) -> int:
        self.max = max(self.max, self.read())
        return self.max

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


class CpuMeter:
    kind = "cpu"
    what = "process RSS (VmRSS / VmHWM)"

    def __init__(self):
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self._sampler = _Sampler(rss, 0.001)
            self.what = "process RSS sampled every 1 ms (VmHWM reset not permitted here)"

    def current(self) -> int:
        return rss()

    def reset_peak(self) -> None:
        if self._sampler is not None:
            self._sampler.reset()
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        if self._sampler is not None:
            return self._sampler.value()
        return max(_status_kib("VmHWM"), rss())

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()


class CudaMeter:
    kind = "cuda"
    what = "torch.cuda allocator (max_memory_allocated; reserved - allocated = allocator overhead)"

    def __init__(self, device):
        import torch  # noqa: PLC0415

        self.torch = torch
        self.device = torch.device(device)
        self.host = CpuMeter()

    def sync(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def current(self) -> int:
        self.sync()
        return int(self.torch.cuda.memory_allocated(self.device))

    def reserved(self) -> int:
        return int(self.torch.cuda.memory_reserved(self.device))

    def reset_peak(self) -> None:
        self.sync()
        self.torch.cuda.reset_peak_memory_stats(self.device)
        self.host.reset_peak()

    def peak(self) -> int:
        self.sync()
        return int(self.torch.cuda.max_memory_allocated(self.device))

    def peak_reserved(self) -> int:
        self.sync()
        return int(self.torch.cuda.max_memory_reserved(self.device))

    def close(self) -> None:
        self.host.close()


class JetsonMeter(CudaMeter):
    kind = "jetson"
    what = "system used memory (MemTotal - MemAvailable, sampled every 2 ms; CPU and GPU share it)"

    def __init__(self, device):
        super().__init__(device)
        self.system = _Sampler(system_used, 0.002)

    def system_current(self) -> int:
        return system_used()

    def reset_peak(self) -> None:
        super().reset_peak()
        self.system.reset()

    def system_peak(self) -> int:
        self.sync()
        return self.system.value()

    def close(self) -> None:
        super().close()
        self.system.close()


def system_used() -> int:
    m = meminfo()
    return m["MemTotal"] - m.get("MemAvailable", m.get("MemFree", 0))


def open_meter(device: str):
    if str(device).startswith("cuda"):
        return JetsonMeter(device) if is_jetson() else CudaMeter(device)
    return CpuMeter()


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []
