"""Device placement without a GPU: GPU indices checked against the host, and the caller's current CUDA context
kept (ONNX Runtime's CUDA provider calls cudaSetDevice in the calling thread and leaves it set). The GPU side of
this is scripts/multi_gpu.py on a two-GPU machine; here the logic around the driver is tested with a stand-in
driver object that records what is made current."""

from __future__ import annotations

import ctypes

import pytest

from audioldm2_trt.runtime.backends import cuda_driver, ort
from audioldm2_trt.runtime.backends.base import Device
from audioldm2_trt.runtime.errors import BackendError


def test_gpu_index_beyond_the_host_names_the_gpus_present(monkeypatch):
    monkeypatch.setattr(ort, "cuda_device_count", lambda: 2)
    with pytest.raises(BackendError, match=r"cuda:7 asked for, but this host has 2 CUDA GPU\(s\): cuda:0, cuda:1"):
        ort._check_gpu_index(None, Device.parse("cuda:7"))
    ort._check_gpu_index(None, Device.parse("cuda:1"))  # present: no error
    monkeypatch.setattr(ort, "cuda_device_count", lambda: 0)
    with pytest.raises(BackendError, match=r"this host has 0 CUDA GPU\(s\): none"):
        ort._check_gpu_index(None, Device.parse("cuda"))


class _Driver:
    """cuCtxGetCurrent / cuCtxSetCurrent over one thread's current-context slot."""

    def __init__(self, current: int):
        self.current = current
        self.set_calls = []

    def cuCtxGetCurrent(self, ref):
        ctypes.cast(ref, ctypes.POINTER(ctypes.c_void_p))[0] = self.current or None
        return 0

    def cuCtxSetCurrent(self, ctx):
        self.current = ctx.value or 0
        self.set_calls.append(self.current)
        return 0


def test_caller_context_is_restored_after_a_call_that_moves_it(monkeypatch):
    driver = _Driver(current=0x1000)  # the caller's context (its GPU 0)
    monkeypatch.setattr(cuda_driver, "_libcuda", lambda: driver)
    with cuda_driver.caller_context_kept():
        driver.current = 0x2000  # what cudaSetDevice(1) inside ONNX Runtime does
    assert driver.current == 0x1000
    with pytest.raises(RuntimeError), cuda_driver.caller_context_kept():
        driver.current = 0x2000
        raise RuntimeError("a failing run")
    assert driver.current == 0x1000
    none = _Driver(current=0)  # a thread with no current context gets none back
    monkeypatch.setattr(cuda_driver, "_libcuda", lambda: none)
    with cuda_driver.caller_context_kept():
        none.current = 0x2000
    assert none.current == 0


def test_cpu_runtime_never_touches_the_cuda_driver(runtime, monkeypatch):
    def forbidden():
        raise AssertionError("the CUDA driver was asked for on a CPU runtime")

    monkeypatch.setattr(cuda_driver, "_libcuda", forbidden)
    out = runtime("a dog barking", num_inference_steps=2, audio_length_in_s=1.0, seed=0)
    assert out.audios.shape[0] == 1


@pytest.mark.skipif(cuda_driver.cuda_device_count() is not None, reason="this host has an NVIDIA driver")
def test_without_a_driver_there_is_no_count_and_no_context():
    assert cuda_driver.cuda_device_count() is None
    assert cuda_driver.current_context() is None
    with cuda_driver.caller_context_kept():
        pass
