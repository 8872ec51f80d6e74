"""The GPU's used memory as NVML reports it (the whole device): one measure for torch and ONNX Runtime alike.

``GpuMemory`` reads it on demand (``used_mib``) and, as a context manager, samples it in a thread with
perf_counter stamps: ``mib`` is the peak above the level at entry, ``peak_mib`` the peak itself, ``at(t)`` the
level at a moment (which stage of a call made it grow). Shared by benchmark.py, cold_start.py and peak_memory.py.
"""

from __future__ import annotations

import threading
import time


class GpuMemory:
    def __init__(self, index: int = 0, interval_s: float = 0.002):
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._info = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle)
        self._interval = interval_s
        self.samples: list[tuple[float, float]] = []  # (perf_counter, MiB used)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def used_mib(self) -> float:
        return self._info().used / 2**20

    def _record(self) -> None:
        self.samples.append((time.perf_counter(), self.used_mib()))

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self._interval)

    def __enter__(self) -> "GpuMemory":
        self._record()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record()

    @property
    def peak_mib(self) -> float:
        return max(m for _, m in self.samples)

    @property
    def mib(self) -> float:
        """Peak above the level at entry."""
        return self.peak_mib - self.samples[0][1]

    def at(self, t: float) -> float:
        """The last sample at or before ``t`` (the first one if none)."""
        before = [m for s, m in self.samples if s <= t]
        return before[-1] if before else self.samples[0][1]
