"""Which GPU kernels a generation spends its time in, per component — for the UNet-step and vocoder gaps in
docs/benchmarks.md.

    python scripts/profile_kernels.py --artifacts /tmp/art-fp16 [--device cuda] [--runs 10] [--out DIR]

One request (10.24 s, DPM-20, CFG) records each component's real inputs; then each component's session is run
``--runs`` times alone under ``torch.profiler`` (CUPTI sees every kernel of the process, ONNX Runtime's too, also
inside CUDA graphs). Prints and writes, per component, the wall time per run, the kernels by GPU time (count per
run, µs per run; kernels.txt the ``--top``, kernels.json all), their time by category (``CATEGORIES``: convolution,
attention, GEMM, normalisation, and the element-wise and layout glue a fusing compiler would fold away), and the sum
of kernel time against wall time: a large gap means launch or host
overhead, a small one means the kernels themselves are slow. torch is only the profiler here; the runtime under
test imports none.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np

# Kernel name → what it does, first match wins (cuDNN's convolutions are implicit GEMMs: matched before GEMM; its
# fused attention is named "…sdpa…flash_fprop…": matched before convolutions).
# "elementwise" and "layout" are the glue a fusing compiler folds into the kernels around it. "io": copies from and to
# pageable host memory — this script's numpy feeds in and outputs out, which the runtime's bound device buffers do not
# make (and a CPU-placed node's, where a graph has one; the captured graphs have none). Kept out of the kernel totals
# and reported beside them: the UNet's 67 input copies were 0.18 ms of the 5.35 ms of "kernels" in run CL's profile.
IO = "io"
CATEGORIES = (
    (IO, r"Memcpy (HtoD \(Pageable|DtoH \(Device -> Pageable)"),
    ("attention", r"flash|sdpa|fmha|AddBiasUnpack|AddBiasTranspose|Attention|softmax"),
    ("convolution", r"fprop|dgrad|wgrad|conv"),
    ("gemm", r"nvjet|gemm|cublas|cutlass"),
    ("normalization", r"LayerNorm|GroupNorm|InstanceNorm|SkipLayerNorm|RMSNorm|normali[sz]"),
    ("elementwise", r"ElementWise|op_generic_tensor|_Fill|Gelu|Relu|Sigmoid|Silu|Tanh|Erf|Where|Clip|Pow"),
    ("layout", r"Transpose|transpose|Split|Concat|Slice|Gather|Expand|Pad|Cast|Copy|copy|Memcpy|Memset|Resize|Upsample|Tile"),
)


def category(kernel: str) -> str:
    return next((name for name, pattern in CATEGORIES if re.search(pattern, kernel)), "other")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--components", default="unet,vocoder,vae_decoder,t5_encoder,gpt2,clap_text")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per component in kernels.txt (kernels.json has all)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from audioldm2_trt.runtime import AudioLDM2Runtime

    # the loop on the host: with the device loop the UNet runs from bound buffers and its feeds are never seen here
    # (each session is profiled alone below, so the loop's placement does not change what is measured)
    rt = AudioLDM2Runtime.load(args.artifacts, device=args.device, device_loop=False)
    feeds: dict = {}
    for name, session in rt._sessions.items():  # record each component's first real inputs
        # run, and start (CLAP's text branch is started on its worker while T5 runs: conditioning.py)
        for method in ("run", "start"):
            if not hasattr(session, method):
                continue

            def recording(inputs, _call=getattr(session, method), _name=name):
                if _name not in feeds:
                    feeds[_name] = {k: v.copy() for k, v in inputs.items()}
                return _call(inputs)
            setattr(session, method, recording)
    # With a context graph (the fused UNet's) the loop feeds the UNet from bound buffers (``unet_key_buffers``): record
    # the conditioning the context graph is given and the per-step inputs the UNet's replays are given instead
    context, unet = rt._unet_context, rt._sessions.get("unet")
    if context is not None and unet is not None:
        def conditioning(text, *a, _call=context.device_feeds, **k):
            feeds.setdefault("unet_conditioning", {n: np.array(v) for n, v in text.items()})
            return _call(text, *a, **k)

        def step_inputs(bound, inputs, *a, _call=unet.replay, **k):
            feeds.setdefault("unet_step", {n: np.array(v) for n, v in inputs.items()})
            return _call(bound, inputs, *a, **k)
        context.device_feeds, unet.replay = conditioning, step_inputs
    rt("techno music with a strong upbeat tempo", negative_prompt="low quality, noisy", num_inference_steps=20,
       guidance_scale=3.5, audio_length_in_s=10.24, seed=0)
    if "unet" not in feeds and "unet_conditioning" in feeds:  # the step graph's inputs: the context graph's outputs
        feeds["unet"] = {**context.host_feeds(feeds["unet_conditioning"]), **feeds["unet_step"]}
    if context is not None:
        context.__dict__.pop("device_feeds", None)
    # clap_audio runs only to rank several waveforms: its feeds come from a batch-4 request (the others' stay)
    rt("techno music with a strong upbeat tempo", num_inference_steps=2, audio_length_in_s=10.24, seed=0,
       num_waveforms_per_prompt=4)
    for session in rt._sessions.values():
        for method in ("run", "start", "replay"):
            session.__dict__.pop(method, None)  # back to the class's method
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    report: dict = {"artifacts": args.artifacts, "device": args.device, "health": rt.health(), "components": {}}
    lines = []
    for name in args.components.split(","):
        session, inputs = rt._sessions[name], feeds[name]
        session.run(inputs)  # warm (and captured, where graphs are on)
        walls = []
        with profile(activities=activities) as prof:
            for _ in range(args.runs):
                t0 = time.perf_counter()
                session.run(inputs)
                walls.append(time.perf_counter() - t0)
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels.sort(key=lambda e: e.device_time_total, reverse=True)
        categories = {e.key: category(e.key) for e in kernels}
        on_device = [e for e in kernels if categories[e.key] != IO]
        io = [e for e in kernels if categories[e.key] == IO]
        gpu_us = sum(e.device_time_total for e in on_device) / args.runs
        row = {"wall_ms": statistics.median(walls) * 1e3, "kernel_ms_per_run": gpu_us / 1e3,
               "kernels_per_run": sum(e.count for e in on_device) / args.runs,
               "io_us_per_run": sum(e.device_time_total for e in io) / args.runs,
               "io_copies_per_run": sum(e.count for e in io) / args.runs,
               "inputs": {k: list(v.shape) for k, v in inputs.items()},
               "all": [{"kernel": e.key[:160], "category": categories[e.key], "count_per_run": e.count / args.runs,
                        "us_per_run": e.device_time_total / args.runs} for e in kernels]}
        by_category: dict = {}
        for k in row["all"]:
            c = by_category.setdefault(k["category"], {"us_per_run": 0.0, "count_per_run": 0.0})
            c["us_per_run"] += k["us_per_run"]
            c["count_per_run"] += k["count_per_run"]
        row["by_category"] = dict(sorted(by_category.items(), key=lambda kv: -kv[1]["us_per_run"]))
        report["components"][name] = row
        lines.append(f"== {name} {row['inputs']}: wall {row['wall_ms']:.2f} ms, kernels {row['kernel_ms_per_run']:.2f} ms "
                     f"in {row['kernels_per_run']:.0f} launches per run (not counted: {row['io_copies_per_run']:.0f} copies from "
                     f"and to pageable host memory, {row['io_us_per_run']:.0f} us)")
        lines.append("   by category: " + ", ".join(f"{c} {v['us_per_run']:.0f} us / {v['count_per_run']:.0f}"
                                                   for c, v in row["by_category"].items()))
        listed = [f"   {k['us_per_run']:9.1f} us  x{k['count_per_run']:<6.0f} {k['category']:<13} {k['kernel']}"
                  for k in row["all"][: args.top]]
        lines += listed
        print("\n".join(lines[-2 - len(listed):]), flush=True)
        Path(args.out, "kernels.json").write_text(json.dumps(report, indent=1))
    Path(args.out, "kernels.txt").write_text("\n".join(lines) + "\n")
    rt.close()


if __name__ == "__main__":
    main()
