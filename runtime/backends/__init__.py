"""Backends run one exported component at a time behind the small ``Session`` interface."""

# The backends ``AudioLDM2Runtime.load(backend=...)`` takes (kept here, where the command line reads it without
# importing the pipeline): "ort" — ONNX Runtime, CPU or CUDA provider; "ort-trt" — ONNX Runtime's TensorRT provider
# over the same ONNX files; "trt" — TensorRT engines from ``audioldm2-trt build``.
BACKENDS = ("ort", "ort-trt", "trt")
