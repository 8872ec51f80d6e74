"""TensorRT backend: the engines ``audioldm2-trt build`` writes, behind the same ``run(feeds)`` interface
as the ONNX Runtime backend. Device memory through cuda-python (no torch).

- engines are deserialised once per runtime; each component has ``slots`` execution contexts;
- the activation memory of the pipeline's engines is shared: ``slots`` scratch buffers of the largest
  engine's requirement, allocated once; a run holds one slot's lock, so a scratch buffer is never
  used by two contexts at once;
- the GPU is explicit: every CUDA call runs with the runtime's device made current and the caller's
  current device restored afterwards.

Not done: CUDA-graph capture of the UNet step (the ORT backend has it). Nothing in this module has been
executed in this project — TensorRT cannot be installed on its machines (README: TensorRT).
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, BackendError
from .base import Device

_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


class _Cuda:
    """The few cuda-python runtime calls this backend needs, pinned to one device."""

    def __init__(self, device: Device):
        try:
            from cuda.bindings import runtime as cudart
        except ModuleNotFoundError as err:
            raise BackendError("the TensorRT backend needs cuda-python: pip install cuda-python") from err
        self.rt = cudart
        self.index = device.index

    @contextlib.contextmanager
    def current(self):
        previous = _check(self.rt.cudaGetDevice())
        _check(self.rt.cudaSetDevice(self.index))
        try:
            yield
        finally:
            _check(self.rt.cudaSetDevice(previous))

    def malloc(self, nbytes: int) -> int:
        return int(_check(self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        _check(self.rt.cudaFree(ptr))

    def to_device(self, ptr: int, array: np.ndarray, stream) -> None:
        _check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def to_host(self, array: np.ndarray, ptr: int, stream) -> None:
        _check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def stream(self):
        return _check(self.rt.cudaStreamCreate())

    def sync(self, stream) -> None:
        _check(self.rt.cudaStreamSynchronize(stream))


class _Slot:
    """One concurrency slot: a lock, a stream and the shared scratch memory."""

    def __init__(self, cuda: _Cuda, scratch_bytes: int):
        self.lock = threading.Lock()
        self.stream = cuda.stream()
        self.scratch = cuda.malloc(scratch_bytes)
        self.scratch_bytes = scratch_bytes


class TrtSession:
    """One engine. ``run`` picks a free slot, sets shapes, copies in, executes, copies out."""

    def __init__(self, name: str, engine, trt, cuda: _Cuda, slots: list[_Slot]):
        self.name = name
        self._engine = engine
        self._cuda = cuda
        self._slots = slots
        tensors = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [t for t in tensors if engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT]
        self.output_names = [t for t in tensors if engine.get_tensor_mode(t) == trt.TensorIOMode.OUTPUT]
        self._dtype = {t: _NP[engine.get_tensor_dtype(t).name] for t in tensors}
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._contexts = [engine.create_execution_context(strategy) for _ in slots]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise BackendError(f"{self.name}: missing inputs {sorted(missing)}")
        for i, slot in enumerate(self._slots):  # a free slot, else wait for the first
            if slot.lock.acquire(blocking=False):
                break
        else:
            i, slot = 0, self._slots[0]
            slot.lock.acquire()
        try:
            with self._cuda.current():
                return self._run(self._contexts[i], slot, feeds)
        finally:
            slot.lock.release()

    def _run(self, ctx, slot: _Slot, feeds: dict) -> dict:
        ctx.set_device_memory(slot.scratch, slot.scratch_bytes)
        buffers = []
        try:
            for name in self.input_names:
                array = np.ascontiguousarray(feeds[name], dtype=self._dtype[name])
                if not ctx.set_input_shape(name, array.shape):
                    raise BackendError(f"{self.name}: input {name} shape {array.shape} is outside the engine's "
                                       f"profile {self._engine.get_tensor_profile_shape(name, 0)}; rebuild with "
                                       "larger --max-batch / --lengths")
                ptr = self._cuda.malloc(array.nbytes)
                buffers.append(ptr)
                self._cuda.to_device(ptr, array, slot.stream)
                ctx.set_tensor_address(name, ptr)
            outputs = {}
            for name in self.output_names:
                out = np.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtype[name])
                ptr = self._cuda.malloc(out.nbytes)
                buffers.append(ptr)
                ctx.set_tensor_address(name, ptr)
                outputs[name] = (out, ptr)
            if not ctx.execute_async_v3(slot.stream):
                raise BackendError(f"{self.name}: TensorRT execution failed")
            for out, ptr in outputs.values():
                self._cuda.to_host(out, ptr, slot.stream)
            self._cuda.sync(slot.stream)
            return {k: (v[0].astype(np.float32) if v[0].dtype == np.float16 else v[0]) for k, v in outputs.items()}
        finally:
            for ptr in buffers:
                self._cuda.free(ptr)


def load_engines(folder, device: Device, names, slots: int = 2) -> dict[str, TrtSession]:
    """Deserialise ``folder/trt/<name>.plan`` for each component, after checking ``engines.json``
    against this machine (TensorRT version, GPU, compute capability) and the artefacts' ONNX hashes."""
    from ...export.trt_build import ENGINE_DIR, ENGINE_MANIFEST, check_platform, import_tensorrt, platform_info

    trt = import_tensorrt()
    folder = Path(folder)
    manifest_path = folder / ENGINE_DIR / ENGINE_MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder} has no TensorRT engines ({manifest_path} missing); build them with: "
                            f"audioldm2-trt build {folder}")
    entries = json.loads(manifest_path.read_text())["engines"]
    artefacts = json.loads((folder / "manifest.json").read_text())["components"]
    platform = platform_info(device.index)
    cuda = _Cuda(device)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engines = {}
    with cuda.current():
        for name in names:
            entry = entries.get(name)
            if entry is None or entry["onnx_sha256"] != artefacts[name]["sha256"]:
                raise ArtifactError(f"the {name} engine in {folder} is missing or was built from other ONNX files; "
                                    f"rebuild with: audioldm2-trt build {folder}")
            check_platform(entry, platform, folder)
            engine = runtime.deserialize_cuda_engine((folder / ENGINE_DIR / entry["file"]).read_bytes())
            if engine is None:
                raise ArtifactError(f"TensorRT could not deserialise {entry['file']}; rebuild with: "
                                    f"audioldm2-trt build {folder}")
            engines[name] = engine
        scratch = max(e.device_memory_size_v2 for e in engines.values())
        shared = [_Slot(cuda, scratch) for _ in range(slots)]
        return {name: TrtSession(name, e, trt, cuda, shared) for name, e in engines.items()}
