"""Full-size validation on a GPU (not CI): export, per-component check, runtime vs diffusers on the same latents.

    python scripts/gpu_validate.py export  --out /tmp/art-full      # export + validate every component on CUDA
    python scripts/gpu_validate.py compare --art /tmp/art-full      # runtime (ORT CUDA fp32) vs diffusers fp32

Random full-size weights (`--random-weights audioldm2`). Writes a JSON and a Markdown table to --results.
TF32 is off on both sides: this checks the fp32 export, not speed (scripts/benchmark.py measures speed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _pipe(config):
    from audioldm2_trt.export.sources import Source, load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(Source(random_config=config))
    return pipe, time.perf_counter() - t0


def cmd_export(args) -> dict:
    from audioldm2_trt.export.onnx_export import export
    from audioldm2_trt.export.sources import Source
    from audioldm2_trt.export.validate import validate
    from audioldm2_trt.runtime.artifacts import load_artifacts

    pipe, t_build = _pipe(args.config)
    t0 = time.perf_counter()
    out = export(Source(random_config=args.config), args.out, overwrite=True, pipe=pipe, precision=args.precision)
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    checks = validate(out, device=args.device, pipe=pipe)
    t_validate = time.perf_counter() - t0
    m = load_artifacts(out).manifest
    return {
        "build_random_pipeline_s": t_build, "export_s": t_export, "validate_s": t_validate,
        "files": {n: {"bytes": e["bytes"], "external_data": e["external_data"]} for n, e in m["components"].items()},
        "checks": [{"component": c.component, "batch": c.shape.batch, "seq": c.shape.seq, "frames": c.shape.frames,
                    "output": c.output, "rel_l2": c.rel_l2, "max_abs": c.max_abs, "precision": c.precision, "ok": c.passed}
                   for c in checks],
    }


def cmd_compare(args) -> dict:
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.shapes import audio_shape

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pipe, _ = _pipe(args.config)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(args.device)
    t0 = time.perf_counter()
    rt = AudioLDM2Runtime.load(args.art, device=args.device)
    t_load = time.perf_counter() - t0
    kw = dict(prompt="techno music with a strong upbeat tempo and high melodic riffs", negative_prompt="low quality",
              num_inference_steps=20, guidance_scale=3.5, audio_length_in_s=10.24)
    shape = audio_shape(rt.constants, kw["audio_length_in_s"])
    lat = np.random.default_rng(0).standard_normal((1, 8, shape.latent_frames, 16)).astype(np.float32)

    def run_diffusers():
        out = pipe(**kw, latents=torch.from_numpy(lat).to(args.device)).audios
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    def timed(fn, n):
        times, out = [], None
        for _ in range(n):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return out, times

    rt_out, rt_times = timed(lambda: rt(**kw, latents=lat).audios, args.runs + 1)
    ref, ref_times = timed(run_diffusers, args.runs + 1)
    rel = float(np.linalg.norm(rt_out - ref) / np.linalg.norm(ref))
    return {
        "runtime_load_s": t_load, "rel_l2_waveform": rel, "max_abs": float(np.abs(rt_out - ref).max()),
        "ref_peak": float(np.abs(ref).max()), "samples": int(ref.shape[1]),
        "runtime_first_s": rt_times[0], "runtime_median_s": statistics.median(rt_times[1:]),
        "diffusers_first_s": ref_times[0], "diffusers_median_s": statistics.median(ref_times[1:]),
        "runs": args.runs, "request": kw,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--out", required=True)
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    c = sub.add_parser("compare")
    c.add_argument("--art", required=True)
    c.add_argument("--runs", type=int, default=3)
    ap.add_argument("--results", default=".")
    ap.add_argument("--config", default="audioldm2", help="random-weights config (tiny for a CPU smoke run)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    import onnxruntime
    import torch

    result = cmd_export(args) if args.cmd == "export" else cmd_compare(args)
    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    result["date"] = time.strftime("%Y-%m-%d")
    path = Path(args.results) / f"gpu_{args.cmd}{'_fp16' if getattr(args, 'precision', 'fp32') == 'fp16' else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
