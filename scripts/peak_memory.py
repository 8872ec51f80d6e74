"""Peak GPU memory of the runtime and of diffusers (B0), each in a fresh process, counted the same way.

    python scripts/peak_memory.py --artifacts /tmp/art-fp16 [--which runtime,runtime_no_ranking,b0] [--calls 5] [--out DIR]

benchmark.py measures each configuration inside one shared process: the runtime first (its figure includes
creating the CUDA context), B0 last with torch's context already made and not counted, and with the CUDA
libraries the runtime loaded already resident. Here every configuration gets a process of its own, and its peak
is NVML's used memory on the GPU above the level before that process started — CUDA context, libraries, weights,
workspaces and arenas alike — over load, the first call and ``--calls`` warm calls (batch 1, the benchmark's
request). Writes peak_memory.json.

The ``runtime*`` rows then make two more calls — two waveforms of the request (seed 1: the batch-4 UNet and the
ranking sessions; skipped without ranking) and the first request again — reported apart from the batch-1 peak, and
save their audio (``--audio-dir``). The parent compares each row's audio with the ``runtime`` row's and a row's
repeated first request with its first, as rel-L2: every row must give the same audio up to the fp16 UNet's
run-to-run spread (~2e-3, docs/benchmarks.md), which is how a captured graph writing into another component's memory
would show.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmark import REQUEST
from shared_arena_check import DECODE_STAGE

from audioldm2_trt.runtime.pipeline import captured_except

TEXT_SESSIONS = ("clap_text", "t5_encoder", "projection")  # those that run once per request
from gpu_memory import GpuMemory

# runtime rows: name → child_runtime arguments. runtime_unpacked: each weight in an allocation of its own (the default
# until packed weights, ONNX Runtime's own); *_packed_all: every component that allows it (unet_variant.py's UNet);
# runtime_no_block: the UNet's and VAE decoder's weights one allocation each, ONNX Runtime's (the default before
# backends/weights_block.py).
# runtime: the default, on CUDA the decode stage captured on ONNX Runtime's shared arena (as from run BA to BF, and
# since run BN, with the runtime's buffers in memory of its own since run BJ), and since run BP CLAP's text branch and
# the projection uncaptured with a 256 KiB cuBLAS workspace; runtime_bn_default: every session captured with 1 MiB
# (the default from run BN to BP); runtime_own_arenas: one arena per session (the default from run BF to BN).
ROWS = {"runtime": {}, "runtime_no_ranking": {"ranking": False},
        "runtime_bn_default": {"cuda_graphs": captured_except(()), "cublas_workspace_kib": 1024},
        "runtime_own_arenas": {"shared_arena": False},
        # the decode stage uncaptured, on the shared arena (what run BA's arena saved, without captured graphs on it)
        # and off it (what running it uncaptured costs alone)
        "runtime_decode_arena_uncaptured": {"shared_arena": DECODE_STAGE, "cuda_graphs": captured_except(DECODE_STAGE)},
        "runtime_decode_uncaptured": {"shared_arena": False, "cuda_graphs": captured_except(DECODE_STAGE)},
        "runtime_unpacked": {"packed_weights": False},
        "runtime_packed_all": {"packed_weights": True},
        "runtime_no_block": {"weights_block": False},
        # cuBLAS's workspace per handle (KiB; the default 1024 from run BD to BP, 256 since): run BA's default, and 256
        "runtime_ws4m": {"cublas_workspace_kib": 4096},
        "runtime_ws256k": {"cublas_workspace_kib": 256},
        # the loops each waited for: where the warm calls' growth comes from
        "runtime_unqueued": {"queued_steps": False},
        "runtime_lm_host": {"lm_loop": False},
        # sessions run without CUDA graphs: where the +32 MiB at the fourth request comes from (the once-per-request
        # text sessions' captures, runs BC-BD), and with cuBLAS's 256 KiB workspace beside it
        "runtime_text_uncaptured": {"cuda_graphs": captured_except(TEXT_SESSIONS)},
        "runtime_t5_uncaptured": {"cuda_graphs": captured_except("t5_encoder")},
        "runtime_clap_proj_uncaptured": {"cuda_graphs": captured_except(("clap_text", "projection"))},
        "runtime_text_uncaptured_ws256k": {"cuda_graphs": captured_except(TEXT_SESSIONS), "cublas_workspace_kib": 256},
        # CLAP's text branch and the projection uncaptured (−12 MiB, ~0.5 ms, run BF) with the 256 KiB workspace
        # (−16 MiB, the same speed, run BD): the two cheapest of what was left between the default and B0, together
        # the default since run BP (3120 MiB against B0's 3126)
        "runtime_clap_proj_uncaptured_ws256k": {"cuda_graphs": captured_except(("clap_text", "projection")),
                                                "cublas_workspace_kib": 256},
        "b0": None}


def child_runtime(folder: str, calls: int, base: float, audio_path: str | None = None, **load_options) -> dict:
    """load_options: ``AudioLDM2Runtime.load``'s (a row of ROWS)."""
    import numpy as np

    from audioldm2_trt.runtime import AudioLDM2Runtime

    marks, audio = {}, {}
    with GpuMemory() as mem:
        rt = AudioLDM2Runtime.load(folder, device="cuda", **load_options)
        marks["after load"] = mem.used_mib() - base
        audio["first"] = rt(**REQUEST, seed=0).audios
        marks["after the first call"] = mem.used_mib() - base
        for i in range(calls):
            rt(**REQUEST, seed=0)
            marks[f"after warm call {i + 1}"] = mem.used_mib() - base
        marks["after the warm calls"] = mem.used_mib() - base
        peak_batch1 = max(m for _, m in mem.samples)
        if load_options.get("ranking", True):
            audio["two"] = rt(**REQUEST, seed=1, num_waveforms_per_prompt=2).audios
        audio["again"] = rt(**REQUEST, seed=0).audios
        marks["after two waveforms and the first request again"] = mem.used_mib() - base
    if audio_path:
        np.savez(audio_path, **audio)
    return {"peak_mib": peak_batch1 - base, "peak_with_the_later_calls_mib": mem.peak_mib - base, "marks_mib": marks,
            "health": rt.health()}


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
                    help="comma-separated: " + ", ".join(ROWS))
    ap.add_argument("--audio-dir", help="where the runtime rows save their audio (default: --out)")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", default=".")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--base", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--audio-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.child:
        result = child_b0(args.calls, args.base) if args.child == "b0" else \
            child_runtime(args.artifacts, args.calls, args.base, audio_path=args.audio_file, **ROWS[args.child])
        print("RESULT " + json.dumps(result), flush=True)
        return
    unknown = set(args.which.split(",")) - set(ROWS)
    if unknown:
        ap.error(f"--which: unknown {sorted(unknown)}; choose from {', '.join(ROWS)}")
    audio_dir = Path(args.audio_dir or args.out)
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for which in args.which.split(","):
        time.sleep(2)  # let the previous process's memory go back
        base = GpuMemory().used_mib()
        cmd = [sys.executable, __file__, "--child", which, "--calls", str(args.calls), "--base", str(base)]
        if args.artifacts:
            cmd += ["--artifacts", args.artifacts]
        if which != "b0":
            cmd += ["--audio-file", str(audio_dir / f"audio-{which}.npz")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        rows[which] = {"idle_mib": base, **json.loads(line[0][7:])} if line else {"error": proc.stderr[-3000:]}
        print(which, json.dumps(rows[which]), flush=True)
        Path(args.out, "peak_memory.json").write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "artifacts": args.artifacts,
            "request": REQUEST, "calls": args.calls, "rows": rows,
            "audio_rel_l2": compare_audio(audio_dir, [w for w in rows if w != "b0" and "error" not in rows[w]])},
            indent=1))


def compare_audio(audio_dir: Path, rows: list[str]) -> dict:
    """rel-L2 of each runtime row's audio against the ``runtime`` row's (same call), and of each row's repeated first
    request against its first."""
    import numpy as np

    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    saved = {w: dict(np.load(audio_dir / f"audio-{w}.npz")) for w in rows}
    out = {}
    for which, audio in saved.items():
        out[which] = {"again vs its first call": rel(audio["again"], audio["first"])}
        if which != "runtime" and "runtime" in saved:
            out[which].update({f"{call} vs runtime": rel(audio[call], saved["runtime"][call])
                               for call in audio if call in saved["runtime"]})
    return out


if __name__ == "__main__":
    main()
