"""The runtime's NVML reader (ctypes, ``runtime/backends/nvml.py``) against pynvml on the same GPU, before and after
a 1 GiB device allocation, and the GPU each finds (CUDA's PCI bus id, NVML's). Prints one JSON line; run AB
(docs/benchmarks.md) ran it as it is here.

    python scripts/nvml_check.py        # on a CUDA machine with pynvml and onnxruntime-gpu
"""
import json, pynvml, numpy as np, onnxruntime as ort
from audioldm2_trt.runtime.backends.nvml import used_memory_reader
from audioldm2_trt.runtime.backends.cuda_driver import pci_bus_id, device_name
pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0); r = used_memory_reader(0)
a, b = r(), pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
x = ort.OrtValue.ortvalue_from_shape_and_type([256, 1024, 1024], np.float32, "cuda", 0)
c, d = r(), pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
print(json.dumps({"bus": pci_bus_id(0), "name": device_name(0), "pynvml_bus": pynvml.nvmlDeviceGetPciInfo(h).busId if hasattr(pynvml.nvmlDeviceGetPciInfo(h), "busId") else None,
                  "ctypes_before": a, "pynvml_before": b, "ctypes_after_1GiB": c, "pynvml_after_1GiB": d}, default=str))
