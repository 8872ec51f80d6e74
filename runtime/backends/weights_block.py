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
(``OrtSession.close`` closes it after the session; the session object keeps it otherwise, ``attach``). The DLPack
side is ``dlpack.py``'s, shared with the runtime's bound buffers.

Not for components whose convolutions ``prefer_nhwc`` moves to NHWC (the vocoder): prepacking copies those weights
into a transposed allocation of ONNX Runtime's own, and the block would hold a second copy that nothing reads.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dlpack import ALIGNMENT, ONNX_TYPES, Memory, ortvalue_over


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
    if data_type not in ONNX_TYPES:
        return None
    count = int(np.prod(dims)) if dims else 1
    nbytes = count * ONNX_TYPES[data_type][1] // 8
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
        self._memory = Memory.allocate(total, cuda_index)
        base = self._memory.address
        files: dict[Path, tuple] = {}  # file → (open file, its map)
        try:
            for init, offset in zip(self.initializers, offsets):
                if init.file not in files:
                    f = open(init.file, "rb")
                    files[init.file] = (f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                self._copy(files[init.file][1], init, offset)
                self.values[init.name] = ortvalue_over(ort, base + offset, init.dims, ONNX_TYPES[init.data_type],
                                                        cuda_index, self._memory)
        except BaseException:
            self.close()
            raise
        finally:
            for f, mapped in files.values():
                mapped.close()
                f.close()

    def _copy(self, mapped, init: Initializer, offset: int) -> None:
        """``init``'s bytes from the mapped file into the block at ``offset`` (no view of the map outlives this)."""
        source = np.frombuffer(mapped, np.uint8, init.nbytes, init.offset)
        try:
            self._memory.copy_in(offset, source.ctypes.data, init.nbytes)
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
