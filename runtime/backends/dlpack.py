"""OrtValues over memory the runtime allocates itself, handed to ONNX Runtime through DLPack without a copy.

Two users:

- ``weights_block.py``: a session's weights in one block of the runtime's own (``WeightsBlock``).
- ``OrtSession``'s bound buffers (inputs, outputs, the loops' latents) on a CUDA device whose shared arena is
  registered (``own_value``; ``shared_arena.py`` says why): since onnxruntime 1.23 the Python bindings allocate
  ``OrtValue.ortvalue_from_numpy`` / ``ortvalue_from_shape_and_type`` from an allocator registered in the environment
  for that device, so without this every runtime's buffers of the process would come from the shared arena (measured
  on the H100, run BI: ``scripts/ortvalue_allocator_probe.py``, +256 MiB, the arena's first chunk, at the first value).

Lifetime (DLPack's contract): the producer keeps a DLManagedTensor, and the memory it describes, until the consumer
calls its deleter. ONNX Runtime calls it when the last reference to the tensor goes — for an initializer when the
session that took it is destroyed, which can be after the runtime closed its ``OrtSession`` (an I/O binding held
elsewhere keeps the session alive). So the structures live here, keyed by address, until that call, and the memory
until its last tensor's call after ``Memory.close`` (run BF: freeing them on close instead let ONNX Runtime read a
freed structure — "A dlpack structure must have a deleter", the process aborted).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

# ONNX TensorProto.DataType → (DLPack type code, bits). DLPack codes: 0 int, 1 uint, 2 float, 4 bfloat. Bool is left
# to ONNX Runtime (from_dlpack would make it uint8).
ONNX_TYPES = {1: (2, 32), 2: (1, 8), 3: (0, 8), 4: (1, 16), 5: (0, 16), 6: (0, 32), 7: (0, 64), 10: (2, 16),
              11: (2, 64), 12: (1, 32), 13: (1, 64), 16: (4, 16)}
# numpy dtype → (DLPack type code, bits): the types of the runtime's bound buffers
NUMPY_TYPES = {np.dtype(np.float32): (2, 32), np.dtype(np.float16): (2, 16), np.dtype(np.float64): (2, 64),
               np.dtype(np.int64): (0, 64), np.dtype(np.int32): (0, 32), np.dtype(np.int8): (0, 8),
               np.dtype(np.uint8): (1, 8)}
ALIGNMENT = 256  # bytes; what CUDA's allocations and ONNX Runtime's arena give each tensor


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


# The deleter takes the DLManagedTensor's address as a plain integer (no ctypes pointer object is built in the call)
_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]
_CAPSULE_NAME = b"dltensor"
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_DL_CPU, _DL_CUDA = 1, 2

# Every DLManagedTensor handed to ONNX Runtime and not yet released by it (the module docstring says why)
_LIVE: dict[int, tuple] = {}  # address → (DLManagedTensor, its shape array, the Memory it points into)
_LIVE_LOCK = threading.Lock()


def _released(address) -> None:
    """The deleter ONNX Runtime calls (any thread, the GIL taken by ctypes); never raises into it."""
    try:
        with _LIVE_LOCK:
            entry = _LIVE.pop(address, None)
        if entry is not None:
            entry[2].tensor_released()
    except Exception:  # noqa: BLE001 (e.g. at interpreter exit, with this module half torn down)
        pass


_RELEASED = _DELETER(_released)
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_RELEASED))  # never freed: ONNX Runtime may call it at interpreter exit


class Memory:
    """Memory the runtime allocated (device: a ``cuda_driver.DeviceBlock``; host: a numpy buffer) and how many tensors
    over it ONNX Runtime holds; freed once it is closed and none is held."""

    def __init__(self, device=None, host=None):
        self.device, self.host = device, host
        self._tensors, self._closed, self._lock = 0, False, threading.Lock()

    @classmethod
    def allocate(cls, nbytes: int, cuda_index: int | None) -> "Memory":
        """``nbytes`` of device memory of CUDA GPU ``cuda_index`` (one ``cuMemAlloc``), or of host memory where it is
        None; ``address`` is ``ALIGNMENT``-aligned either way."""
        if cuda_index is None:
            return cls(host=np.empty(max(nbytes, 1) + ALIGNMENT, np.uint8))
        from .cuda_driver import DeviceBlock

        return cls(device=DeviceBlock(cuda_index, nbytes))

    @property
    def address(self) -> int:
        """Where the memory starts (for host memory, the first aligned byte of its buffer)."""
        if self.device is not None:
            return self.device.address
        return -(-self.host.ctypes.data // ALIGNMENT) * ALIGNMENT

    def copy_in(self, offset: int, host_address: int, nbytes: int) -> None:
        """Copy ``nbytes`` from host memory at ``host_address`` to ``offset`` bytes past ``address`` (synchronous)."""
        if self.device is not None:
            self.device.copy_in(offset, host_address, nbytes)  # (it checks the bounds)
            return
        if offset < 0 or self.address - self.host.ctypes.data + offset + nbytes > self.host.nbytes:
            raise ValueError(f"copy of {nbytes} bytes at offset {offset} outside the host buffer")
        ctypes.memmove(self.address + offset, host_address, nbytes)

    def tensor_made(self) -> None:
        with self._lock:
            self._tensors += 1

    def tensor_released(self) -> None:
        with self._lock:
            self._tensors -= 1
            free = self._closed and self._tensors == 0
        if free:
            self._free()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            free = self._tensors == 0
        if free:
            self._free()

    def _free(self) -> None:
        device, self.device, self.host = self.device, None, None
        if device is not None:
            device.close()


def ortvalue_over(ort, address: int, dims: tuple, dl_type: tuple[int, int], cuda_index: int | None, owner: Memory):
    """An ``onnxruntime.OrtValue`` of shape ``dims`` and DLPack type ``dl_type`` (code, bits) over the bytes at
    ``address`` (no copy) — device memory of CUDA GPU ``cuda_index``, or host memory where it is None — counted in
    ``owner`` until ONNX Runtime releases it (``_released``)."""
    code, bits = dl_type
    shape = (ctypes.c_int64 * max(len(dims), 1))(*dims)
    device = _DLDevice(_DL_CPU, 0) if cuda_index is None else _DLDevice(_DL_CUDA, cuda_index)
    managed = _DLManagedTensor()
    managed.dl_tensor = _DLTensor(address, device, len(dims), _DLDataType(code, bits, 1), shape, None, 0)
    managed.deleter = _RELEASED
    key = ctypes.addressof(managed)
    with _LIVE_LOCK:
        _LIVE[key] = (managed, shape, owner)
    owner.tensor_made()
    capsule = _capsule_new(key, _CAPSULE_NAME, None)
    from_dlpack = ort.capi._pybind_state.OrtValue.from_dlpack
    try:
        try:
            value = from_dlpack(capsule)
        except TypeError:  # older onnxruntime: from_dlpack(data, is_bool_tensor)
            value = from_dlpack(capsule, False)
    except BaseException:
        _released(key)  # not consumed: ONNX Runtime will never call the deleter
        raise
    return ort.OrtValue(value)


def own_value(ort, shape: tuple, dtype, cuda_index: int | None, source: np.ndarray | None = None):
    """An OrtValue of ``shape`` and ``dtype`` in an allocation of its own (``cuMemAlloc`` on CUDA GPU ``cuda_index``;
    host memory where it is None), holding a copy of ``source`` where given (its shape and dtype must match), else
    uninitialised. The allocation is freed when ONNX Runtime releases the value (the last OrtValue over it goes)."""
    dtype = np.dtype(dtype)
    if dtype not in NUMPY_TYPES:
        raise TypeError(f"no buffer of the runtime's own for dtype {dtype}; allowed: {sorted(map(str, NUMPY_TYPES))}")
    shape = tuple(int(d) for d in shape)
    if source is not None:
        source = np.ascontiguousarray(source)
        if source.shape != shape or source.dtype != dtype:
            raise ValueError(f"source {source.shape} {source.dtype} does not match the buffer {shape} {dtype}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    memory = Memory.allocate(nbytes, cuda_index)
    try:
        if source is not None and nbytes:
            memory.copy_in(0, source.ctypes.data, nbytes)
        return ortvalue_over(ort, memory.address, shape, NUMPY_TYPES[dtype], cuda_index, memory)
    finally:
        memory.close()  # freed once ONNX Runtime releases the value (at once, where it holds none)
