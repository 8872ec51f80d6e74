"""What ``close()`` gives back, and whether loading the same artefacts again and again grows GPU memory — for servers
that reload a model. A measurement script (docs/benchmarks.md), not a test.

    python scripts/reload_memory.py --artifacts DIR [--device cuda:0] [--cycles 4] [--steps 5] --out DIR

One process: the GPU's used memory (NVML, the whole device) before anything is loaded, then ``--cycles`` times: load
the runtime in a ``with`` block, make one request (the benchmark's prompt, 10.24 s, ``--steps`` DPM-Solver++ steps:
the CUDA graphs of the 20-step request, which do not depend on the step count), read the memory, leave the block
(``close()``), collect garbage, read it again. What stays after a close is what the process keeps for its next load:
the CUDA context and libraries, the decode stage's shared ONNX Runtime arena (one per process and device, registered
in ONNX Runtime's environment: ``runtime/backends/shared_arena.py``). A later cycle's readings above the first's are
memory that a reload does not find again. Each request's audio is compared with the first cycle's (the same seed).
Writes reload_memory.json.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from result_json import write_result  # scripts/ is on the path of a script run from it

PROMPT = "techno music with a strong upbeat tempo and high melodic riffs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.backends.base import Device
    from audioldm2_trt.runtime.backends.nvml import used_memory_reader

    used = used_memory_reader(Device.parse(args.device).index)
    result = {"artifacts": args.artifacts, "device": args.device, "steps": args.steps, "before_mib": used(),
              "cycles": []}
    first_audio = None
    for cycle in range(args.cycles):
        start = time.perf_counter()
        with AudioLDM2Runtime.load(args.artifacts, device=args.device) as rt:
            load_s = time.perf_counter() - start
            audio = rt(PROMPT, negative_prompt="low quality, noisy", num_inference_steps=args.steps, seed=0).audios
            loaded_mib = used()
            health = rt.health()
        gc.collect()
        time.sleep(0.5)  # NVML's reading after the frees
        closed_mib = used()
        if first_audio is None:
            first_audio = audio
        row = {"cycle": cycle, "load_s": load_s, "loaded_mib": loaded_mib, "closed_mib": closed_mib,
               "freed_by_close_mib": loaded_mib - closed_mib,
               "audio_max_abs_diff_vs_first": float(np.abs(audio - first_audio).max()),
               "shared_arena": health["shared_arena"], "closed_health_ok": rt.health()["ok"]}
        result["cycles"].append(row)
        print(f"cycle {cycle}: load {load_s:.1f} s, loaded {loaded_mib:.0f} MiB, after close {closed_mib:.0f} MiB "
              f"(before anything {result['before_mib']:.0f}), audio vs first {row['audio_max_abs_diff_vs_first']:.2e}",
              flush=True)
    cycles = result["cycles"]
    result["growth_after_first_cycle_mib"] = {"loaded": cycles[-1]["loaded_mib"] - cycles[0]["loaded_mib"],
                                              "closed": cycles[-1]["closed_mib"] - cycles[0]["closed_mib"]}
    print("growth from the first cycle to the last:", result["growth_after_first_cycle_mib"])
    write_result(args.out, "reload_memory.json", result)


if __name__ == "__main__":
    main()
