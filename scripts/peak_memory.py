"""Peak GPU memory of the runtime and of diffusers (B0), each in a fresh process, counted the same way.

    python scripts/peak_memory.py --artifacts /tmp/art-fp16 [--which runtime,runtime_no_ranking,b0] [--calls 5] [--out DIR]

benchmark.py measures each configuration inside one shared process: the runtime first (its figure includes
creating the CUDA context), B0 last with torch's context already made and not counted, and with the CUDA
libraries the runtime loaded already resident. Here every configuration gets a process of its own, and its peak
is NVML's used memory on the GPU above the level before that process started — CUDA context, libraries, weights,
workspaces and arenas alike — over load, the first call and ``--calls`` warm calls (batch 1, the benchmark's
request). Writes peak_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmark import REQUEST
from gpu_memory import GpuMemory


def child_runtime(folder: str, calls: int, base: float, ranking: bool = True) -> dict:
    from audioldm2_trt.runtime import AudioLDM2Runtime

    marks = {}
    with GpuMemory() as mem:
        rt = AudioLDM2Runtime.load(folder, device="cuda", ranking=ranking)
        marks["after load"] = mem.used_mib() - base
        rt(**REQUEST, seed=0)
        marks["after the first call"] = mem.used_mib() - base
        for _ in range(calls):
            rt(**REQUEST, seed=0)
        marks["after the warm calls"] = mem.used_mib() - base
    return {"peak_mib": mem.peak_mib - base, "marks_mib": marks}


def child_b0(calls: int, base: float) -> dict:
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from audioldm2_trt.export.sources import Source, load_pipeline

    pipe = load_pipeline(Source(random_config="audioldm2"))  # on the CPU: nothing on the GPU yet
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    marks = {}
    with GpuMemory() as mem:
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        marks["CUDA context"] = mem.used_mib() - base
        pipe = pipe.to("cuda", torch.float16)
        torch.cuda.synchronize()
        marks["after load"] = mem.used_mib() - base
        for i in range(1 + calls):
            pipe(**REQUEST, generator=torch.Generator("cuda").manual_seed(0))
            torch.cuda.synchronize()
            if i == 0:
                marks["after the first call"] = mem.used_mib() - base
        marks["after the warm calls"] = mem.used_mib() - base
    return {"peak_mib": mem.peak_mib - base, "marks_mib": marks,
            "torch_max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", help="fp16 artefact folder (for 'runtime')")
    ap.add_argument("--which", default="runtime,b0",
                    help="comma-separated: runtime, runtime_no_ranking (loaded with ranking=False), b0")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", default=".")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--base", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.child:
        result = child_b0(args.calls, args.base) if args.child == "b0" else \
            child_runtime(args.artifacts, args.calls, args.base, ranking=args.child != "runtime_no_ranking")
        print("RESULT " + json.dumps(result), flush=True)
        return
    unknown = set(args.which.split(",")) - {"runtime", "runtime_no_ranking", "b0"}
    if unknown:
        ap.error(f"--which: unknown {sorted(unknown)}; choose from runtime, runtime_no_ranking, b0")
    rows = {}
    for which in args.which.split(","):
        time.sleep(2)  # let the previous process's memory go back
        base = GpuMemory().used_mib()
        cmd = [sys.executable, __file__, "--child", which, "--calls", str(args.calls), "--base", str(base)]
        if args.artifacts:
            cmd += ["--artifacts", args.artifacts]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        rows[which] = {"idle_mib": base, **json.loads(line[0][7:])} if line else {"error": proc.stderr[-3000:]}
        print(which, json.dumps(rows[which]), flush=True)
        Path(args.out, "peak_memory.json").write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "artifacts": args.artifacts,
            "request": REQUEST, "calls": args.calls, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
