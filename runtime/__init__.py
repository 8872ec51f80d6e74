"""Torch-free AudioLDM 2 runtime over exported ONNX files (numpy, tokenizers, onnxruntime)."""

from .errors import (
    AudioLDM2Error, ArtifactError, BackendError, ExportError, InvalidRequestError, NonFiniteError, QueueFullError,
    RequestCancelled,
)

__all__ = [
    "AudioLDM2Error", "ArtifactError", "BackendError", "ExportError", "InvalidRequestError",
    "NonFiniteError", "QueueFullError", "RequestCancelled", "AudioLDM2Runtime", "AudioOutput", "MicroBatcher",
]


def __getattr__(name):  # keep `import audioldm2_trt.runtime` cheap: onnxruntime loads on first use
    if name in ("AudioLDM2Runtime", "AudioOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "MicroBatcher":
        from .batching import MicroBatcher

        return MicroBatcher
    raise AttributeError(name)
