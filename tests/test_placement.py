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


@pytest.mark.skipif(cuda_driver.cuda_device_count() is not None, reason="this host has an NVIDIA driver")
def test_without_a_driver_no_loop_stream_can_be_made():
    with pytest.raises(RuntimeError, match="the CUDA driver does not start: no stream can be made"):
        cuda_driver.CudaStream(0)


def test_provider_options_are_merged_per_component_and_checked():
    from audioldm2_trt.runtime.backends.ort_options import COMPONENT_PROVIDER_OPTIONS, merge_component_options
    from audioldm2_trt.runtime.errors import BackendError

    merged = merge_component_options(COMPONENT_PROVIDER_OPTIONS, {"unet": {"sdpa_kernel": 0, "use_tf32": 0},
                                                                  "vocoder": {"prefer_nhwc": 0}})
    assert merged["unet"] == {"sdpa_kernel": 0, "use_tf32": 0, "cudnn_conv_algo_search": "HEURISTIC"}
    assert merged["vocoder"] == {"prefer_nhwc": 0}  # the caller's value wins over the default's
    assert COMPONENT_PROVIDER_OPTIONS["vocoder"] == {"prefer_nhwc": 1}  # defaults untouched
    assert COMPONENT_PROVIDER_OPTIONS["unet"] == {"sdpa_kernel": 19, "cudnn_conv_algo_search": "HEURISTIC"}
    with pytest.raises(BackendError, match=r"provider option unet.sdpa_kernel = True: use a str, int or float"):
        merge_component_options({}, {"unet": {"sdpa_kernel": True}})
    with pytest.raises(BackendError, match="provider options for 'unet' must be a dict"):
        merge_component_options({}, {"unet": 19})


def test_per_component_defaults_follow_the_artefacts_precision():
    """The fp16 set was measured on fp16 artefacts; with fp32 ones (TF32 off) prefer_nhwc made the vocoder 3x slower,
    so fp32 artefacts get only their vocoder's heuristic convolution search (the exhaustive one failed captured)."""
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory
    from audioldm2_trt.runtime.backends.ort_options import COMPONENT_PROVIDER_OPTIONS, FP32_COMPONENT_PROVIDER_OPTIONS

    assert OrtSessionFactory("cpu", precision="fp16").component_options == COMPONENT_PROVIDER_OPTIONS
    assert OrtSessionFactory("cpu", precision="fp32").component_options == FP32_COMPONENT_PROVIDER_OPTIONS
    assert FP32_COMPONENT_PROVIDER_OPTIONS == {"vocoder": {"cudnn_conv_algo_search": "HEURISTIC"}}
    assert set(COMPONENT_PROVIDER_OPTIONS) == {"unet", "vae_decoder", "gpt2", "clap_text", "vocoder", "clap_features"}
    assert COMPONENT_PROVIDER_OPTIONS["gpt2"] == {"sdpa_kernel": 2 | 16}  # its attention has a bias: no flash, no cuDNN
    assert COMPONENT_PROVIDER_OPTIONS["clap_text"] == {"sdpa_kernel": 2 | 16}  # likewise, where it is fused
    assert COMPONENT_PROVIDER_OPTIONS["clap_features"] == {"use_tf32": 0}  # the DFT needs fp32 accuracy
    assert "cudnn_conv_algo_search" not in COMPONENT_PROVIDER_OPTIONS["vocoder"]  # HEURISTIC fails on its convs


def test_factory_settings_out_of_range_are_named():
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory
    from audioldm2_trt.runtime.errors import BackendError

    with pytest.raises(BackendError, match="graph_optimization 'max' is not one of disable, basic, extended, all"):
        OrtSessionFactory("cpu", graph_optimization="max")
    with pytest.raises(BackendError, match="precision 'fp8' is not one of fp16, fp32"):
        OrtSessionFactory("cpu", precision="fp8")


def test_provider_options_need_the_default_cuda_provider(tiny_artifacts):
    from audioldm2_trt.runtime import AudioLDM2Runtime, InvalidRequestError

    with pytest.raises(InvalidRequestError, match="provider_options apply to backend 'ort' with the default CUDA "
                                                  "provider; got backend 'ort', device 'cpu'"):
        AudioLDM2Runtime.load(tiny_artifacts, device="cpu", provider_options={"unet": {"sdpa_kernel": 19}})
    with pytest.raises(InvalidRequestError, match=r"provider_options name unknown components \['unett'\]"):
        AudioLDM2Runtime.load(tiny_artifacts, device="cuda", provider_options={"unett": {"sdpa_kernel": 19}})
