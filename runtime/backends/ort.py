"""ONNX Runtime backend: CPU or CUDA execution provider over the exported ONNX files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import BackendError
from .base import Device

log = logging.getLogger("audioldm2_trt.runtime")


class OrtSession:
    """One ``onnxruntime.InferenceSession``; errors are re-raised naming the component and shapes."""

    def __init__(self, name: str, session):
        self.name = name
        self._session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._session.run(self.output_names, feeds)
        except Exception as err:  # onnxruntime raises its own exception types; name what failed
            shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in feeds.items()}
            raise BackendError(f"{self.name} failed on inputs {shapes}: {err}") from err
        return dict(zip(self.output_names, outputs))


class OrtSessionFactory:
    """Creates sessions on one explicit device. ``device="cuda"`` without a working CUDA provider is
    an error, never a silent CPU run."""

    def __init__(self, device: str | Device = "cpu", providers: list | None = None, threads: int = 0):
        import onnxruntime as ort

        self.ort = ort
        self.device = device if isinstance(device, Device) else Device.parse(device)
        self.threads = threads
        available = ort.get_available_providers()
        if providers is None:
            if self.device.kind == "cuda":
                # TF32 off: the exported graphs are fp32 and are validated against fp32 PyTorch.
                # cudnn_conv1d_pad_to_nc1d: about 2x faster HiFi-GAN 1-D convolutions (ort-cuda-facts.md).
                providers = [("CUDAExecutionProvider", {"device_id": self.device.index, "use_tf32": 0,
                                                        "cudnn_conv1d_pad_to_nc1d": 1})]
            else:
                providers = ["CPUExecutionProvider"]
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        missing = [n for n in names if n not in available]
        if missing:
            raise BackendError(
                f"execution provider(s) {missing} not available in onnxruntime {ort.__version__} "
                f"(available: {available}); for CUDA install onnxruntime-gpu matching your CUDA version"
            )
        if self.device.kind == "cuda" and "CUDAExecutionProvider" not in names and "TensorrtExecutionProvider" not in names:
            raise BackendError(f"device {self.device} asked for, but providers {names} contain no GPU provider")
        self.providers = providers

    def create(self, name: str, path: str | Path) -> OrtSession:
        opts = self.ort.SessionOptions()
        opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        try:
            session = self.ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as err:
            raise BackendError(f"could not load {name} from {path}: {err}") from err
        used = session.get_providers()
        if self.device.kind == "cuda" and used[0] not in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            raise BackendError(f"{name}: asked for {self.device} but onnxruntime placed it on {used}")
        return OrtSession(name, session)
