"""Backends run one exported component at a time behind the small ``Session`` interface."""

# The backends ``AudioLDM2Runtime.load(backend=...)`` takes (kept here, where the command line reads it without
# importing the pipeline): "ort" — ONNX Runtime, CPU or CUDA provider; "ort-trt" — ONNX Runtime's TensorRT provider
# over the same ONNX files; "trt" — TensorRT engines from ``audioldm2-trt build``.
BACKENDS = ("ort", "ort-trt", "trt")


def check_backend(backend: str, device: str):
    """``device`` ("cpu", "cuda" or "cuda:N") parsed into a ``base.Device`` once ``backend`` is checked: one of
    ``BACKENDS``, and other than "ort" only on CUDA. InvalidRequestError names the bad value otherwise."""
    from ..errors import InvalidRequestError
    from .base import Device

    if backend not in BACKENDS:
        raise InvalidRequestError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    dev = Device.parse(device)
    if backend != "ort" and dev.kind != "cuda":
        raise InvalidRequestError(f"backend {backend!r} runs on CUDA only; got device {device!r}")
    return dev
