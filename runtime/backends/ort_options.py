"""ONNX Runtime's provider and session options as this runtime sets them: the default CUDA provider's options, the
per-component additions measured for each precision, cuBLAS's workspace, and the TensorRT provider's list. Each
choice keeps the measurement that made it (docs/benchmarks.md); ``OrtSessionFactory`` (``ort.py``) applies them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import BackendError
from .base import Device

log = logging.getLogger("audioldm2_trt.runtime")

GRAPH_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                      "all": "ORT_ENABLE_ALL"}
# cuBLAS's workspace per handle, in KiB (CUBLAS_WORKSPACE_CONFIG=:1024:1, one 1 MiB buffer). cuBLAS's own default
# on the H100 cost about 120 MiB per ONNX Runtime session (half at creation, half on the first run; the UNet about
# 240): 5007 → 3863 MiB for the fp16 runtime after its first call with 4 MiB, with no slowdown measured
# (cold_start.py, docs/benchmarks.md, runs I and J). 1 MiB (since runs BC–BD): 66 MiB less again over the runtime's
# sessions, at the same speed and audio; 256 KiB (since run BP): 16 MiB less again at the same speed (runs BD, BP).
CUBLAS_WORKSPACE_KIB = 256


def limit_cublas_workspace(kib: int | None) -> str | None:
    """Ask cuBLAS for one ``kib`` KiB workspace per handle (``CUBLAS_WORKSPACE_CONFIG=:kib:1``) unless the process
    already sets CUBLAS_WORKSPACE_CONFIG — a value there is the operator's and is kept. Set this way before the
    process's first CUDA session, as ``OrtSessionFactory`` does, it took effect (docs/benchmarks.md, run J); whether
    cuBLAS honours it for handles made after it was first used in the process is not measured. It is process-wide: a
    torch in the same process sizes its own cuBLAS workspace from it too. ``kib=None`` leaves the environment alone.
    Returns the value in effect."""
    if kib is not None:
        if isinstance(kib, bool) or not isinstance(kib, int) or kib < 1:
            raise BackendError(f"cublas_workspace_kib must be a positive integer (KiB) or None, got {kib!r}")
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = f":{kib}:1"
            log.info("CUBLAS_WORKSPACE_CONFIG=:%d:1 (one %d KiB cuBLAS workspace per handle)", kib, kib)
    return os.environ.get("CUBLAS_WORKSPACE_CONFIG")


def cuda_provider_options(device: Device, tf32: bool) -> dict:
    """Options of our default CUDA execution provider.

    use_tf32: on only where the artefacts are fp16 anyway (their fp32-kept parts — T5, the projection, the
    vocoder, CLAP's audio branch, and the VAE decoder with ``--fuse none`` — then run on TF32 tensor cores,
    10-bit mantissa like fp16, fp32's exponent range, so T5 still does not overflow); off for fp32 artefacts, which are validated against fp32 PyTorch at 1e-4.
    On the H100 the fp32 HiFi-GAN took 81 ms with TF32 off (docs/benchmarks.md); ort-cuda-facts.md
    reads 13.3 ms with ONNX Runtime's default (TF32 on).
    cudnn_conv1d_pad_to_nc1d: about 2x faster HiFi-GAN 1-D convolutions (ort-cuda-facts.md).
    kSameAsRequested: the arena grows by what is asked, not to the next power of two (peak memory
    +12 GiB with power-of-two growth on the H100, docs/benchmarks.md).
    """
    return {"device_id": device.index, "use_tf32": int(tf32), "cudnn_conv1d_pad_to_nc1d": 1,
            "arena_extend_strategy": "kSameAsRequested"}


# Per-component additions to the CUDA provider options (measured on the H100, docs/benchmarks.md, 2026-11-26).
# They were measured on fp16 artefacts (TF32 on for their fp32 parts) and apply to those only: with fp32 artefacts
# (TF32 off) prefer_nhwc made the fp32 vocoder 80 → 233 ms (15:21 UTC run), so fp32 artefacts get none of them
# (their own are below).
# unet sdpa_kernel = flash | memory-efficient | unfused (1|2|16), i.e. not cuDNN's flash attention, which ONNX
#   Runtime prefers for fp16 on Hopper: the same step (7.06 vs 7.11 ms alone, 192 vs 192 ms end to end) and the same
#   100-prompt fidelity (1.92e-3 both), but cuDNN builds its attention plans on the first run (UNet first run 4.1 s
#   vs 1.4 s; cold start 16.1 vs 11.2 s, the latter measured second in its process).
# unet, vae_decoder cudnn_conv_algo_search HEURISTIC: cuDNN's heuristics pick each convolution's algorithm instead of
#   timing every candidate on first use (EXHAUSTIVE, ONNX Runtime's default). Clean-process cold start 9.4 / 10.1 s
#   vs 11.5 / 12.1 s (first UNet step 0.6–0.8 vs 1.7–1.8 s, first VAE 0.16–0.19 vs 0.74–0.95 s), warm end to end
#   184 / 185 vs 186 / 188 ms (scripts/cold_start.py, 15:21 UTC). The vocoder keeps EXHAUSTIVE: HEURISTIC fails on
#   its dilated 1-D convolutions (CUDNN_FE HEURISTIC_QUERY_FAILED, 14:50 UTC).
# vocoder prefer_nhwc: HiFi-GAN's 1-D convolutions without the NCHW↔NHWC transposes cuDNN inserts around them
#   (fp16 9.1 → 7.5 ms, fp32 + TF32 13.4 → 10.7 ms).
# gpt2 sdpa_kernel = memory-efficient | unfused (2|16): the fused GPT-2's MultiHeadAttention has an attention bias (the
#   causal-and-padding mask), which flash attention does not take; without the option ONNX Runtime would try cuDNN's
#   flash attention first on Hopper, which builds its plans on the first run (the UNet's cold start, above).
# clap_text sdpa_kernel 2|16, for the same reason, where its attention is MultiHeadAttention (export recipe
#   CLAP_TEXT_ATTENTION since run CN, CLAP_TEXT_MEA since run CR; artefacts exported before have no attention node
#   there, and the option changes nothing for them): uncaptured and fed the prompt's own token count (rounded up to a
#   multiple of 8 since run CR), it would otherwise build cuDNN plans for each new length.
# clap_features use_tf32 0: its DFT is a 1024-tap convolution whose fp32 accuracy the log-mel needs (faint bins
#   sit 100 dB under loud ones); without TF32 it is still a fraction of a millisecond.
COMPONENT_PROVIDER_OPTIONS = {"unet": {"sdpa_kernel": 1 | 2 | 16, "cudnn_conv_algo_search": "HEURISTIC"},
                              "vae_decoder": {"cudnn_conv_algo_search": "HEURISTIC"},
                              "gpt2": {"sdpa_kernel": 2 | 16},
                              "clap_text": {"sdpa_kernel": 2 | 16},
                              "vocoder": {"prefer_nhwc": 1},
                              "clap_features": {"use_tf32": 0}}


# fp32 artefacts (TF32 off): the vocoder's convolution algorithms chosen by cuDNN's heuristics. With the exhaustive
#   search (ONNX Runtime's default) the tiny fp32 export's vocoder, captured, failed with CUDA error 700 / 715 when its
#   batch-1 graph was replayed after batch 4 and batch 2 had been searched and captured, with two or three vocoder
#   sessions in the process (two runtimes); one session, the order 4, 2, 1, 4, no CUDA graphs and the heuristic search
#   each passed (run AU, scripts/vocoder_shapes_check.py). With the heuristic search the failing script passes and the
#   exhaustive one still fails in the same run; at full size neither failed, the fp32 export validates, and the
#   vocoder takes 41 instead of 81 ms a request (run AV, docs/benchmarks.md). Why the exhaustive search fails is not
#   known. (The fp16 vocoder keeps it: the heuristic query fails on its fp16 dilated convolutions, see above.)
FP32_COMPONENT_PROVIDER_OPTIONS = {"vocoder": {"cudnn_conv_algo_search": "HEURISTIC"}}


def default_component_options(precision: str) -> dict:
    """The per-component defaults for artefacts of this precision: ``COMPONENT_PROVIDER_OPTIONS`` for fp16,
    ``FP32_COMPONENT_PROVIDER_OPTIONS`` for fp32 (see above)."""
    return COMPONENT_PROVIDER_OPTIONS if precision == "fp16" else FP32_COMPONENT_PROVIDER_OPTIONS


def merge_component_options(defaults: dict, given: dict) -> dict:
    """{component: {option: value}}: ``given`` over ``defaults``, option by option. Values must be str/int/float
    (ONNX Runtime passes provider options as strings)."""
    merged = {name: dict(opts) for name, opts in defaults.items()}
    for name, opts in given.items():
        if not isinstance(opts, dict):
            raise BackendError(f"provider options for {name!r} must be a dict of option → value, got {opts!r}")
        for key, value in opts.items():
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise BackendError(f"provider option {name}.{key} = {value!r}: use a str, int or float")
        merged[name] = {**merged.get(name, {}), **opts}
    return merged


def default_mem_pattern(device: Device) -> bool:
    """ONNX Runtime's memory pattern: off on CUDA (captured graphs do not allocate; the arena reuses blocks better
    without it), on on the CPU (see ``OrtSessionFactory``)."""
    return device.kind != "cuda"


def default_tf32(precision: str) -> bool:
    """TF32 for the fp32 parts of fp16 artefacts only (see ``cuda_provider_options``)."""
    return precision == "fp16"


def ort_tensorrt_providers(folder: Path, device: Device, precision: str) -> list:
    """ONNX Runtime's TensorRT provider over the artefacts' ONNX files, CUDA for what TensorRT does not take;
    engines and timing cache kept in ``folder/ort_trt_cache``."""
    cache = str(Path(folder) / "ort_trt_cache")
    return [
        ("TensorrtExecutionProvider", {"device_id": device.index, "trt_fp16_enable": precision == "fp16",
                                       "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                       "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}),
        ("CUDAExecutionProvider", {"device_id": device.index, "use_tf32": 0, "cudnn_conv1d_pad_to_nc1d": 1}),
    ]
