"""Does ONNX Runtime's Python API allocate CUDA OrtValues from a shared arena registered in its environment? One
clean process, NVML:

    python scripts/ortvalue_allocator_probe.py [--device-index 0] [--out DIR]

Why: the runtime binds its device buffers (inputs, outputs, the loops' latents) as OrtValues made by
``OrtValue.ortvalue_from_shape_and_type`` / ``ortvalue_from_numpy``, assumed to come from the Python module's own
CUDA allocator. onnxruntime 1.23 taught the Python bindings to use an allocator shared in the environment
(microsoft/onnxruntime#25346). If such values come from the runtime's shared arena (``backends/shared_arena.py``),
they are long-lived buffers made after captures — the case the arena's rule 2 was to exclude — and a second
runtime's buffers would land in blocks the first one's captured graphs write as scratch: the wrong audio of runs
BF-BH.

How: an OrtValue is made first (the CUDA context, the Python allocator's first chunk); then the shared arena is
registered with a 256 MiB first chunk, and a small OrtValue made each way. If the GPU's use grows by ~256 MiB, the
value came from the shared arena. Writes ortvalue_allocator_probe.json.
"""

from __future__ import annotations

import argparse

import numpy as np

from result_json import write_result  # scripts/ is on the path of a script run from it

FIRST_CHUNK = 256 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device-index", type=int, default=0)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    import onnxruntime as ort

    from audioldm2_trt.runtime.backends.nvml import used_memory_reader

    used = used_memory_reader(args.device_index)
    i = args.device_index
    result = {"onnxruntime": ort.__version__, "first_chunk_mib": FIRST_CHUNK >> 20}
    keep = [ort.OrtValue.ortvalue_from_shape_and_type([256], np.float32, "cuda", i)]  # context + Python allocator
    result["before_registering_mib"] = used()
    info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, i, ort.OrtMemType.DEFAULT)
    config = ort.OrtArenaCfg({"arena_extend_strategy": 0, "initial_chunk_size_bytes": FIRST_CHUNK})
    ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, {"device_id": str(i)}, config)
    result["after_registering_mib"] = used()
    keep.append(ort.OrtValue.ortvalue_from_shape_and_type([512], np.float32, "cuda", i))
    result["after_shape_and_type_mib"] = used()
    keep.append(ort.OrtValue.ortvalue_from_numpy(np.zeros(768, np.float32), "cuda", i))
    result["after_from_numpy_mib"] = used()
    grew = result["after_from_numpy_mib"] - result["after_registering_mib"]
    result["grew_mib"] = grew
    result["values_from_the_shared_arena"] = bool(grew >= (FIRST_CHUNK >> 20) / 2)
    write_result(args.out, "ortvalue_allocator_probe.json", result)


if __name__ == "__main__":
    main()
