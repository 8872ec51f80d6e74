"""The CUDA driver API through ctypes (no torch, no cuda-python): how many GPUs there are, keeping the calling
thread's current CUDA context as the caller left it, one stream with its events (``CudaStream``), and one block of
device memory filled from the host (``DeviceBlock``).

ONNX Runtime's CUDA provider calls ``cudaSetDevice(device_id)`` in the thread that creates a session or runs
one, and leaves it set. A runtime on ``cuda:1`` would then change its caller's current device; servers that
drive other CUDA work from the same threads must not see that. ``caller_context_kept`` saves the thread's
current context before such a call and restores it after.
"""

from __future__ import annotations

import ctypes
import functools
import threading
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


class _PrimaryContext:
    """GPU ``index``'s primary context (the one ONNX Runtime uses), retained until ``release``; ``current()`` makes it
    the calling thread's current context for a block and gives the caller's back after. ``purpose`` completes the
    error raised where the driver does not start."""

    def __init__(self, index: int, purpose: str):
        lib = _libcuda()
        if lib is None:
            raise RuntimeError(f"the CUDA driver does not start: {purpose}")
        self.lib = lib
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        _call(lib.cuDeviceGet(ctypes.byref(dev), int(index)), "cuDeviceGet")
        _call(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        self._device, self._context = dev, ctx

    @contextmanager
    def current(self):
        with caller_context_kept():
            _call(self.lib.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
            yield

    def release(self) -> None:
        self.lib.cuDevicePrimaryCtxRelease_v2(self._device)


class CudaStream:
    """A non-blocking CUDA stream of one GPU (its primary context, the one ONNX Runtime uses), made through the
    driver API for sessions that should queue their work on one stream (``user_compute_stream``): the UNet, its
    context graph and the solver step (backends/ort.py), so that the denoising loop can queue a step behind the
    previous one without waiting for it (runtime/denoising.py).

    Non-blocking: work on the legacy default stream (ONNX Runtime's synchronous copies between host and device)
    neither waits for it nor makes it wait, so a host read of a buffer the stream may still write must wait on an
    event recorded behind that write first (``record`` / ``wait``). Every owner ``retain``s it and ``release``s it
    once its sessions are gone; the last release destroys the stream and its events."""

    def __init__(self, index: int):
        self._context = _PrimaryContext(index, "no stream can be made")
        self._lib, self.index = self._context.lib, index
        self._owners, self._events = 0, []
        self._lock = threading.Lock()
        stream = ctypes.c_void_p()
        try:
            with self._context.current():
                _call(self._lib.cuStreamCreate(ctypes.byref(stream), _CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        except RuntimeError:
            self._context.release()
            raise
        self.handle = stream.value

    def event(self) -> ctypes.c_void_p:
        """A new event of this stream's context (no timing), destroyed with the stream."""
        event = ctypes.c_void_p()
        with self._context.current():
            _call(self._lib.cuEventCreate(ctypes.byref(event), _CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        self._events.append(event)
        return event

    def record(self, event: ctypes.c_void_p) -> None:
        """Mark the work queued on the stream so far (``wait`` returns once it has run)."""
        with self._context.current():
            _call(self._lib.cuEventRecord(event, ctypes.c_void_p(self.handle)), "cuEventRecord")

    def wait(self, event: ctypes.c_void_p) -> None:
        """Block the calling thread until the work ``record``ed before ``event`` has run."""
        with self._context.current():
            _call(self._lib.cuEventSynchronize(event), "cuEventSynchronize")

    def synchronize(self) -> None:
        """Block the calling thread until everything queued on the stream has run."""
        with self._context.current():
            _call(self._lib.cuStreamSynchronize(ctypes.c_void_p(self.handle)), "cuStreamSynchronize")

    def retain(self) -> "CudaStream":
        with self._lock:
            self._owners += 1
        return self

    def release(self) -> None:
        """One owner fewer; the last one destroys the stream (its sessions must be gone)."""
        with self._lock:
            self._owners -= 1
            if self._owners > 0 or self.handle is None:
                return
            handle, self.handle = self.handle, None
        with self._context.current():
            for event in self._events:
                self._lib.cuEventDestroy_v2(event)
            self._events.clear()
            self._lib.cuStreamDestroy_v2(ctypes.c_void_p(handle))
        self._context.release()


class DeviceBlock:
    """One allocation of ``nbytes`` of GPU ``index``'s memory (``cuMemAlloc`` in its primary context, the one ONNX
    Runtime uses), filled from host memory piece by piece (``copy_in``) and freed by ``close`` — only by ``close``:
    whoever hands its memory to others (backends/weights_block.py) decides when nothing reads it any more."""

    def __init__(self, index: int, nbytes: int):
        self._context = _PrimaryContext(index, "no device memory can be allocated")
        self._lib, self.index, self.nbytes = self._context.lib, index, int(nbytes)
        address = ctypes.c_uint64()
        try:
            with self._context.current():
                _call(self._lib.cuMemAlloc_v2(ctypes.byref(address), ctypes.c_size_t(max(self.nbytes, 1))),
                      f"cuMemAlloc of {self.nbytes} bytes on GPU {index}")
        except RuntimeError:
            self._context.release()
            raise
        self.address = address.value

    def copy_in(self, offset: int, host_address: int, nbytes: int) -> None:
        """Copy ``nbytes`` from host memory at ``host_address`` to ``offset`` bytes into the block (synchronous)."""
        if offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"copy of {nbytes} bytes at offset {offset} outside the block of {self.nbytes} bytes")
        with self._context.current():
            _call(self._lib.cuMemcpyHtoD_v2(ctypes.c_uint64(self.address + offset), ctypes.c_void_p(host_address),
                                            ctypes.c_size_t(nbytes)), "cuMemcpyHtoD")

    def close(self) -> None:
        """Free the block (idempotent)."""
        if self.address is None:
            return
        address, self.address = self.address, None
        with self._context.current():
            self._lib.cuMemFree_v2(ctypes.c_uint64(address))
        self._context.release()


_CU_STREAM_NON_BLOCKING = 1
_CU_EVENT_DISABLE_TIMING = 2


def _call(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed: CUDA driver error {code}")
