"""The GPU's used memory as NVML reports it (the whole device): one measure for torch and ONNX Runtime alike.

The sampler is the runtime's own (``audioldm2_trt.runtime.backends.nvml.GpuMemory``, through ctypes), which
``audioldm2-trt bench`` uses too; until 2026-11-27 this module read NVML through pynvml, the same numbers
(checked against pynvml on the H100, docs/benchmarks.md run AB). ``GpuMemory(index)`` takes a CUDA device index:
0 on the one-GPU machines every figure here comes from. Shared by benchmark.py, cold_start.py, peak_memory.py
and session_memory.py.
"""

from __future__ import annotations

from audioldm2_trt.runtime.backends.nvml import GpuMemory

__all__ = ["GpuMemory"]
