"""The CUDA driver API through ctypes (no torch, no cuda-python): how many GPUs there are, and keeping the
calling thread's current CUDA context as the caller left it.

ONNX Runtime's CUDA provider calls ``cudaSetDevice(device_id)`` in the thread that creates a session or runs
one, and leaves it set. A runtime on ``cuda:1`` would then change its caller's current device; servers that
drive other CUDA work from the same threads must not see that. ``caller_context_kept`` saves the thread's
current context before such a call and restores it after.
"""

from __future__ import annotations

import ctypes
import functools
from contextlib import contextmanager


@functools.lru_cache(maxsize=1)
def _driver() -> tuple:
    """(library, started): library None where no NVIDIA driver is installed; started: ``cuInit`` succeeded."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        return lib, lib.cuInit(0) == 0
    return None, False


def _libcuda():
    """The started driver library, or None."""
    lib, started = _driver()
    return lib if started else None


def cuda_device_count() -> int | None:
    """Number of CUDA GPUs (``cuDeviceGetCount``); None if no driver is loadable, 0 if it does not start."""
    lib, started = _driver()
    if lib is None:
        return None
    count = ctypes.c_int(0)
    if not started or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def device_name(index: int) -> str | None:
    """The name of CUDA GPU ``index`` (``cuDeviceGetName``, e.g. "NVIDIA H100 80GB HBM3"), or None where the driver
    does not start or has no such GPU."""
    return _device_string(index, "cuDeviceGetName", 256)


def pci_bus_id(index: int) -> str | None:
    """The PCI bus id of CUDA GPU ``index`` (``cuDeviceGetPCIBusId``, e.g. "0000:19:00.0"): how NVML finds the same
    GPU whatever the CUDA device order or ``CUDA_VISIBLE_DEVICES``; None where the driver cannot tell."""
    return _device_string(index, "cuDeviceGetPCIBusId", 64)


def _device_string(index: int, query: str, size: int) -> str | None:
    """A driver query ``query(char *out, int size, CUdevice)`` of CUDA GPU ``index``; None where it fails."""
    lib = _libcuda()
    if lib is None:
        return None
    dev = ctypes.c_int(0)
    out = ctypes.create_string_buffer(size)
    if lib.cuDeviceGet(ctypes.byref(dev), int(index)) != 0 or getattr(lib, query)(out, len(out), dev) != 0:
        return None
    return out.value.decode(errors="replace")


def current_context() -> int | None:
    """The calling thread's current CUDA context handle (0 = none), or None without a driver."""
    lib = _libcuda()
    if lib is None:
        return None
    ctx = ctypes.c_void_p()
    return (ctx.value or 0) if lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 else None


@contextmanager
def caller_context_kept(enabled: bool = True):
    """Run the block, then make the thread's current CUDA context what it was before (none included).
    ``enabled=False`` (a CPU runtime) runs the block without asking for the driver at all."""
    lib = _libcuda() if enabled else None
    if lib is None:
        yield
        return
    saved = ctypes.c_void_p()
    known = lib.cuCtxGetCurrent(ctypes.byref(saved)) == 0
    try:
        yield
    finally:
        if known:
            lib.cuCtxSetCurrent(saved)
