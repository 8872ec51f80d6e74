"""Torch-free AudioLDM 2 runtime over exported ONNX files (numpy, tokenizers, onnxruntime)."""

from .errors import (
    AudioLDM2Error, ArtifactError, BackendError, ExportError, InvalidRequestError, NonFiniteError,
)

__all__ = [
    "AudioLDM2Error", "ArtifactError", "BackendError", "ExportError", "InvalidRequestError",
    "NonFiniteError", "AudioLDM2Runtime", "AudioOutput",
]


def __getattr__(name):  # keep `import audioldm2_trt.runtime` cheap: onnxruntime loads on first use
    if name in ("AudioLDM2Runtime", "AudioOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
