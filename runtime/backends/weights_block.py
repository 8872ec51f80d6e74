"""A session's weights in one block of memory that the runtime allocates and hands to ONNX Runtime.

ONNX Runtime's CUDA provider gives each initializer an allocation of its own, and CUDA rounds an allocation over
1 MiB up to whole 2 MiB pages: the fused fp16 UNet's 146 weights over 1 MiB (507 MiB) take 656 MiB that way
(docs/benchmarks.md). ONNX Runtime can plan a session's initializers into one buffer itself, but only with
prepacking off (``OrtSessionFactory``'s ``packed_weights``), and the ``NhwcConv`` nodes of the fused UNet and VAE
decoder need prepacking: it is how such a node learns that its weights are NHWC already.

So for those, the runtime reads the initializers' bytes from the ONNX file itself (``read_initializers``: a minimal
reader of the protobuf wire format — the runtime does not import ``onnx``), copies them into one device allocation
(``cuda_driver.DeviceBlock``; on the CPU one numpy buffer), wraps each one's slice as an ``OrtValue`` through DLPack
without copying, and gives those to ONNX Runtime as user-owned initializers (``SessionOptions.add_initializer``), which
it then uses in place of allocating its own (its log says "Using user supplied initializer"). Prepacking stays on.
An initializer that ONNX Runtime places in host memory (a Reshape's shape, say) it declines ("Cannot use user
supplied initializer") and loads itself; its few bytes in the block go unused. Measured on the H100 (run AY,
docs/benchmarks.md): the fused fp16 UNet's and VAE decoder's blocks (653 + 63 MiB) take 150 MiB less than their
allocations per weight, at the same speed and audio; loading takes ~0.35 s longer.

Lifetime: ONNX Runtime holds tensors over the block for as long as the session lives, which can be longer than the
runtime's ``OrtSession`` (an I/O binding held elsewhere keeps it). Each tensor's DLPack structure stays alive until
ONNX Runtime calls its deleter, and the block's memory until the last such call after ``WeightsBlock.close``
(``OrtSession.close`` closes it after the session; the session object keeps it otherwise, ``attach``).

Not for components whose convolutions ``prefer_nhwc`` moves to NHWC (the vocoder): prepacking copies those weights
into a transposed allocation of ONNX Runtime's own, and the block would hold a second copy that nothing reads.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALIGNMENT = 256  # bytes; what CUDA's allocations and ONNX Runtime's arena give each tensor

# ONNX TensorProto.DataType → (DLPack type code, bits). DLPack codes: 0 int, 1 uint, 2 float, 4 bfloat. Bool is left
# to ONNX Runtime (from_dlpack would make it uint8).
_DLPACK_TYPES = {1: (2, 32), 2: (1, 8), 3: (0, 8), 4: (1, 16), 5: (0, 16), 6: (0, 32), 7: (0, 64), 10: (2, 16),
                 11: (2, 64), 12: (1, 32), 13: (1, 64), 16: (4, 16)}


@dataclass(frozen=True)
class Initializer:
    """One initializer of an ONNX graph whose data is raw bytes: in the model file (``raw_data``) or in an external
    data file. ``file`` holds its ``nbytes`` bytes at ``offset``."""

    name: str
    data_type: int  # ONNX TensorProto.DataType
    dims: tuple
    file: Path
    offset: int
    nbytes: int


# --- the protobuf wire format, as far as ModelProto.graph.initializer needs it ---------------------------------

def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value, value start) of each field of the message in ``buf[start:end]``; a
    length-delimited value is (start, end) of its bytes."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = (pos, pos + length), pos + length
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
        yield number, wire, value


def _tensor(buf, start: int, end: int, model: Path) -> Initializer | None:
    """An ``Initializer`` from the TensorProto in ``buf[start:end]``, or None where its data is not raw bytes."""
    dims, data_type, name, raw, external = [], 0, "", None, {}
    for number, wire, value in _fields(buf, start, end):
        if number == 1:  # dims: packed or one varint each
            if wire == 2:
                pos = value[0]
                while pos < value[1]:
                    dim, pos = _varint(buf, pos)
                    dims.append(dim)
            else:
                dims.append(value)
        elif number == 2:
            data_type = value
        elif number == 8:
            name = bytes(buf[value[0]:value[1]]).decode()
        elif number == 9:
            raw = value
        elif number == 13:  # external_data: StringStringEntryProto {key = 1, value = 2}
            entry = {k: bytes(buf[v[0]:v[1]]).decode() for k, _, v in _fields(buf, *value)}
            external[entry.get(1, "")] = entry.get(2, "")
        elif number in (4, 5, 6, 7, 10, 11):  # typed data fields: not raw bytes
            return None
    if data_type not in _DLPACK_TYPES:
        return None
    count = int(np.prod(dims)) if dims else 1
    nbytes = count * _DLPACK_TYPES[data_type][1] // 8
    if raw is not None:
        if raw[1] - raw[0] != nbytes:
            raise ValueError(f"{model}: initializer {name!r} holds {raw[1] - raw[0]} bytes, its shape {dims} "
                             f"needs {nbytes}")
        return Initializer(name, data_type, tuple(dims), model, raw[0], nbytes)
    if "location" in external:
        length = int(external.get("length", nbytes))
        if length != nbytes:
            raise ValueError(f"{model}: initializer {name!r} has {length} external bytes, its shape {dims} "
                             f"needs {nbytes}")
        return Initializer(name, data_type, tuple(dims), model.parent / external["location"],
                           int(external.get("offset", 0)), nbytes)
    return None


def read_initializers(model: str | Path) -> list[Initializer]:
    """The initializers of the ONNX model file's main graph whose data is raw bytes (inline or external), in file
    order; others (typed data fields, strings, bools, sparse ones) are left out: ONNX Runtime allocates those."""
    model = Path(model)
    with open(model, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        found = []
        for number, _, value in _fields(buf, 0, len(buf)):
            if number != 7:  # ModelProto.graph
                continue
            for field, _, span in _fields(buf, *value):
                if field == 5:  # GraphProto.initializer
                    init = _tensor(buf, span[0], span[1], model)
                    if init is not None:
                        found.append(init)
        return found


# --- DLPack: an OrtValue over memory the runtime owns --------------------------------------------------------

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

# DLPack's contract: the producer keeps a DLManagedTensor (and the memory it describes) until the consumer calls its
# deleter. ONNX Runtime calls it when the last reference to the tensor goes — when the session that took the value
# as an initializer is destroyed, which can be after the runtime closed its ``OrtSession`` (an I/O binding held
# elsewhere keeps the session alive). So the structures live here, keyed by address, until that call, and the
# block's memory until its last tensor's call (run BF: freeing them on ``close`` instead let ONNX Runtime read a
# freed structure — "A dlpack structure must have a deleter", the process aborted).
_LIVE: dict[int, tuple] = {}  # address → (DLManagedTensor, its shape array, the _Memory it points into)
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


class _Memory:
    """A block's memory (device: a ``cuda_driver.DeviceBlock``; host: a numpy buffer) and how many tensors over it
    ONNX Runtime holds; freed once it is closed and none is held."""

    def __init__(self, device=None, host=None):
        self.device, self.host = device, host
        self._tensors, self._closed, self._lock = 0, False, threading.Lock()

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


def _ortvalue(ort, address: int, init: Initializer, cuda_index: int | None, owner: _Memory):
    """An ``onnxruntime.OrtValue`` over ``init``'s bytes at ``address`` (no copy), counted in ``owner`` until ONNX
    Runtime releases it (``_released``)."""
    code, bits = _DLPACK_TYPES[init.data_type]
    shape = (ctypes.c_int64 * max(len(init.dims), 1))(*init.dims)
    device = _DLDevice(_DL_CPU, 0) if cuda_index is None else _DLDevice(_DL_CUDA, cuda_index)
    managed = _DLManagedTensor()
    managed.dl_tensor = _DLTensor(address, device, len(init.dims), _DLDataType(code, bits, 1), shape, None, 0)
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


class WeightsBlock:
    """The initializers of one ONNX file (``read_initializers``) in one block: device memory of CUDA GPU
    ``cuda_index`` (``cuda_driver.DeviceBlock``), or host memory where ``cuda_index`` is None; each one's slice
    starts on an ``ALIGNMENT`` boundary. ``add_to(options)`` hands them to a session about to be created."""

    def __init__(self, model: str | Path, ort, cuda_index: int | None = None):
        self.initializers = read_initializers(model)
        offsets, total = [], 0
        for init in self.initializers:
            offsets.append(total)
            total += -(-init.nbytes // ALIGNMENT) * ALIGNMENT
        self.nbytes = total
        self.values = {}
        if cuda_index is None:
            self._memory = _Memory(host=np.empty(max(total, 1) + ALIGNMENT, np.uint8))
            base = -(-self._memory.host.ctypes.data // ALIGNMENT) * ALIGNMENT
        else:
            from .cuda_driver import DeviceBlock

            self._memory = _Memory(device=DeviceBlock(cuda_index, total))
            base = self._memory.device.address
        files: dict[Path, tuple] = {}  # file → (open file, its map)
        try:
            for init, offset in zip(self.initializers, offsets):
                if init.file not in files:
                    f = open(init.file, "rb")
                    files[init.file] = (f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                self._copy(files[init.file][1], init, base, offset)
                self.values[init.name] = _ortvalue(ort, base + offset, init, cuda_index, self._memory)
        except BaseException:
            self.close()
            raise
        finally:
            for f, mapped in files.values():
                mapped.close()
                f.close()

    def _copy(self, mapped, init: Initializer, base: int, offset: int) -> None:
        """``init``'s bytes from the mapped file into the block at ``offset`` (no view of the map outlives this)."""
        source = np.frombuffer(mapped, np.uint8, init.nbytes, init.offset)
        try:
            if self._memory.device is not None:
                self._memory.device.copy_in(offset, source.ctypes.data, init.nbytes)
            else:
                start = base - self._memory.host.ctypes.data + offset
                self._memory.host[start:start + init.nbytes] = source
        finally:
            del source

    def add_to(self, options) -> None:
        """Give every initializer to the session options (``SessionOptions.add_initializer``)."""
        for name, value in self.values.items():
            options.add_initializer(name, value)

    def attach(self, session) -> None:
        """Keep the block alive as long as ``session`` (an ``InferenceSession``) is: an attribute set after its own,
        so that the session is released first when the object goes (a Python object's attributes are released in
        the order they were set)."""
        session._audioldm2_weights_block = self

    def __del__(self):
        # the session holds the block (``attach``): reached once it and the runtime's OrtSession are gone
        self.close()

    def close(self) -> None:
        """Let the memory go (idempotent): at once where ONNX Runtime holds no tensor over it any more, else when it
        releases the last one (the session that read them is destroyed)."""
        self.values = {}  # the Python references: ONNX Runtime calls the deleters of those only it held
        memory = getattr(self, "_memory", None)
        if memory is not None:
            memory.close()
