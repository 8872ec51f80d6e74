"""GPU memory in use as NVML reports it — the whole device, the same measure for ONNX Runtime, TensorRT and torch —
through ctypes (no pynvml, no torch). ``audioldm2-trt bench`` and the measurement scripts (scripts/gpu_memory.py)
read it here.

``GpuMemory(cuda_index)`` reads the used memory on demand (``used_mib``) and, as a context manager, samples it in a
thread with ``time.perf_counter`` stamps: ``mib`` is the peak above the level at entry, ``peak_mib`` the peak itself,
``at(t)`` the level at a moment. The CUDA device is found in NVML by its PCI bus id, so the index is CUDA's (the
runtime's ``cuda:N``), whatever NVML's own order or ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections.abc import Callable

from ..errors import BackendError
from .cuda_driver import pci_bus_id


class _MemoryInfo(ctypes.Structure):  # nvmlMemory_t, bytes
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


@functools.lru_cache(maxsize=1)
def _nvml():
    """The started NVML library, or None (no NVIDIA driver, or ``nvmlInit`` failed)."""
    for name in ("libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        return lib if lib.nvmlInit_v2() == 0 else None
    return None


def used_memory_reader(cuda_index: int) -> Callable[[], float]:
    """A function returning the MiB in use on CUDA GPU ``cuda_index``; BackendError naming what is missing."""
    lib = _nvml()
    if lib is None:
        raise BackendError("GPU memory: NVML (libnvidia-ml) is not available on this machine")
    bus = pci_bus_id(cuda_index)
    if bus is None:
        raise BackendError(f"GPU memory: the CUDA driver does not know GPU cuda:{cuda_index}")
    handle = ctypes.c_void_p()
    if lib.nvmlDeviceGetHandleByPciBusId_v2(bus.encode(), ctypes.byref(handle)) != 0:
        raise BackendError(f"GPU memory: NVML has no GPU at PCI bus id {bus} (cuda:{cuda_index})")
    info = _MemoryInfo()

    def read() -> float:
        if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(info)) != 0:
            raise BackendError(f"GPU memory: NVML could not read cuda:{cuda_index}'s memory")
        return info.used / 2**20

    return read


class GpuMemory:
    """Used memory of one GPU, read on demand or sampled every ``interval_s`` inside a ``with`` block."""

    def __init__(self, cuda_index: int = 0, interval_s: float = 0.002, read: Callable[[], float] | None = None):
        self.used_mib = read or used_memory_reader(cuda_index)
        self._interval = interval_s
        self.samples: list[tuple[float, float]] = []  # (perf_counter, MiB used)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _record(self) -> None:
        self.samples.append((time.perf_counter(), self.used_mib()))

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self._interval)

    def start(self) -> None:
        """A first reading, then one every ``interval_s`` in a thread until ``stop``."""
        self._record()
        self._thread.start()

    def read(self) -> float:
        """One reading now, kept with the samples; returns it (MiB)."""
        self._record()
        return self.samples[-1][1]

    def stop(self) -> None:
        """End the sampling with one more reading; nothing once it has ended (or never started)."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._record()

    def __enter__(self) -> "GpuMemory":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

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
