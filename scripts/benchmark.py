"""End-to-end benchmark: this runtime and the diffusers peers, one process, one table.

    python scripts/benchmark.py --fp16 engines/random-full-fp16 --fp32 engines/random-full
        [--fp16-plain engines/random-full-fp16-plain] [--runs 10] [--skip ...] [--out DIR]

Same prompt, negative prompt, length (10.24 s), DPM-Solver++ 20 steps and CFG 3.5 for everyone; medians of
``--runs`` warm calls after a first call, wall clock around a CUDA-synchronised call. Peers:
B0 diffusers fp16 eager (SDPA), B1 = B0 + ``torch.compile(unet, mode="reduce-overhead", fullgraph=True)``,
B2 = B1 + every other component compiled (default mode). The diffusers pipeline is built from the random
full-size configs with the same seed as ``export --random-weights audioldm2``, so the weights are the ones the
artefacts were exported from. ``--skip`` leaves configurations out (e.g. ``--skip b2``) where a machine's time
limit forces it; the table says what ran.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

from gpu_memory import GpuMemory  # scripts/gpu_memory.py: peak GPU memory, NVML, sampled every 2 ms


PROMPT = "techno music with a strong upbeat tempo and high melodic riffs"
NEGATIVE = "low quality, noisy"
REQUEST = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=20, guidance_scale=3.5,
               audio_length_in_s=10.24)


def timed(fn, runs: int) -> dict:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times), "runs": runs, "all_s": times}


def bench_runtime(folder: str, runs: int, heavy: bool, cuda_graphs="auto", tf32=None, provider_options=None,
                  device_loop=None, packed_weights=None) -> dict:
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.bench import sessions_without_cuda_graphs, stage_medians_ms

    with GpuMemory() as mem:
        t0 = time.perf_counter()
        rt = AudioLDM2Runtime.load(folder, device="cuda", cuda_graphs=cuda_graphs, tf32=tf32,
                                   provider_options=provider_options, device_loop=device_loop,
                                   packed_weights=packed_weights)
        load = time.perf_counter() - t0
        t1 = time.perf_counter()
        rt(**REQUEST, seed=0)
        cold = load + time.perf_counter() - t1
        health = rt.health()
        refused = [n for n, c in health["components"].items() if c["graph_refused"]]
        result = {"load_s": load, "cold_start_s": cold,
                  # as asked: "auto" (the default: every session but backends.ort.UNCAPTURED_BY_DEFAULT), a bool or
                  # the names; "without_cuda_graphs" says what ran without one (as `audioldm2-trt bench` says it)
                  "cuda_graphs": cuda_graphs if isinstance(cuda_graphs, (bool, str)) else sorted(cuda_graphs),
                  "without_cuda_graphs": sessions_without_cuda_graphs(health),
                  "device_loop": rt._solver_step is not None,
                  "components_without_graphs": refused,  # ONNX Runtime refused their capture ("auto")
                  # on CUDA the default's decode stage, for the first runtime of the process only: one loaded after
                  # another has served keeps an arena per session (backends/shared_arena.py)
                  "shared_arena": health["shared_arena"],
                  **timed(lambda: rt(**REQUEST, seed=0), runs)}
        stages = []
        for _ in range(5):
            t: dict = {}
            rt(**REQUEST, seed=0, timings=t)
            stages.append(t)
    result["peak_gpu_mib"] = mem.mib  # load + cold call + warm calls at batch 1
    result["stages_ms"] = stage_medians_ms(stages)
    if heavy:
        result["unet_step_ms_batch2_session_only"] = _session_only(rt) * 1e3
        rt(**{**REQUEST, "num_inference_steps": 200}, scheduler="ddim", seed=0)  # graphs exist already: same shapes
        result["ddim200"] = timed(lambda: rt(**{**REQUEST, "num_inference_steps": 200}, scheduler="ddim", seed=0), 3)
        result["batch4"] = timed(lambda: rt(**REQUEST, num_waveforms_per_prompt=4, seed=0), runs)
        staged = []
        for _ in range(5):
            t = {}
            rt(**REQUEST, num_waveforms_per_prompt=4, seed=0, timings=t)
            staged.append(t)
        result["batch4"]["stages_ms"] = stage_medians_ms(staged)  # "unet_total" was "unet" up to run W
        result["health"] = rt.health()
    rt.close()
    gc.collect()
    return result


def _session_only(rt, runs: int = 50) -> float:
    """Median seconds of the UNet session alone at batch 2 for REQUEST's length, 16 T5 tokens (inputs copied in,
    output copied out; a UNet with a context graph gets that graph's outputs, computed once). Shapes from the UNet's
    spec and the artefacts' constants (full size: sample [2, 8, 256, 16], GPT-2 states [2, 8, 768], T5 states
    [2, 16, 1024])."""
    import numpy as np

    from ort_sweep import shapes_for  # scripts/ort_sweep.py: the same request's shapes for the option sweep

    shapes = shapes_for(rt.constants, REQUEST["audio_length_in_s"])["unet"]
    rng = np.random.default_rng(0)
    session = rt._sessions["unet"]
    feeds = {"sample": rng.standard_normal(shapes["sample"], dtype=np.float32),
             "timestep": np.array([500], dtype=np.int64),
             **rt.unet_feeds({
                 "encoder_hidden_states": rng.standard_normal(shapes["encoder_hidden_states"], dtype=np.float32),
                 "encoder_hidden_states_1": rng.standard_normal(shapes["encoder_hidden_states_1"], dtype=np.float32),
                 "encoder_attention_mask_1": np.ones(shapes["encoder_attention_mask_1"], dtype=np.int64)})}
    session.run(feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_diffusers(runs: int, skip: set[str], results: dict, saved) -> None:
    """B0, B1 and B2 into ``results`` (keys b0, b1, b2), ``saved()`` after each: a machine lost mid-run (runs BV-BW)
    keeps the rows done."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from audioldm2_trt.export.sources import Source, load_pipeline

    pipe = load_pipeline(Source(random_config="audioldm2"))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    torch.cuda.init()
    probe = GpuMemory()
    before = probe.used_mib()
    pipe = pipe.to("cuda", torch.float16)
    torch.cuda.synchronize()
    weights_mib = probe.used_mib() - before

    def call():
        out = pipe(**REQUEST, generator=torch.Generator("cuda").manual_seed(0)).audios
        torch.cuda.synchronize()
        return out

    torch.cuda.reset_peak_memory_stats()
    with GpuMemory() as mem:
        results["b0"] = timed(call, runs)
    results["b0"]["peak_gpu_mib"] = mem.mib + weights_mib  # weights were moved before the sampler started
    results["b0"]["torch_peak_mib"] = torch.cuda.max_memory_reserved() / 2**20
    t0 = time.perf_counter()
    _ddim200(pipe)  # one call: 200 eager steps take seconds, and the machine's time is short
    results["b0"]["ddim200_s"] = time.perf_counter() - t0
    saved()
    if "b1" not in skip:
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        results["b1"] = timed(call, runs)
        saved()
    if "b2" not in skip and "b1" not in skip:
        pipe.text_encoder.text_model = torch.compile(pipe.text_encoder.text_model)
        pipe.text_encoder_2 = torch.compile(pipe.text_encoder_2)
        pipe.language_model = torch.compile(pipe.language_model)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder)
        pipe.vocoder = torch.compile(pipe.vocoder)
        results["b2"] = timed(call, runs)
        saved()


def _ddim200(pipe):
    import torch
    from diffusers import DDIMScheduler

    keep = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(keep.config)
    pipe(**{**REQUEST, "num_inference_steps": 200}, generator=torch.Generator("cuda").manual_seed(0))
    torch.cuda.synchronize()
    pipe.scheduler = keep


def table(res: dict) -> str:
    rows = ["| configuration | end to end, median | first call | notes |", "|---|---|---|---|"]
    d = res.get("diffusers", {})
    names = {"b0": "diffusers fp16 eager, DPM-20 (B0)", "b1": "B0 + compiled UNet, reduce-overhead (B1)",
             "b2": "every component compiled (B2)"}
    for key, label in names.items():
        if key in d:
            extra = f"peak GPU memory +{d[key]['peak_gpu_mib']:.0f} MiB (NVML)" if "peak_gpu_mib" in d[key] else ""
            rows.append(f"| {label} | {d[key]['median_s'] * 1e3:.0f} ms | {d[key]['first_s']:.1f} s | {extra} |")
    for key, label in (("fp16", "ORT CUDA fp16, CUDA graphs"), ("fp32", "ORT CUDA fp32, CUDA graphs"),
                       ("fp16_host_loop", "ORT CUDA fp16, denoising loop on the host (device_loop=False)"),
                       ("fp16_nograph", "ORT CUDA fp16, no CUDA graphs"),
                       ("fp16_notf32", "ORT CUDA fp16, TF32 off for the fp32 parts"),
                       ("fp16_plain", "ORT CUDA fp16, no fusion (--fuse none)"),
                       ("fp16_options", f"ORT CUDA fp16, provider options {res.get('provider_options')}")):
        r = res.get(f"runtime_{key}")
        if r and "error" in r:
            rows.append(f"| this runtime, {label} | failed | | {r['error'][:200]} |")
        elif r:
            s = r["stages_ms"]
            rows.append(f"| this runtime, {label} | {r['median_s'] * 1e3:.0f} ms | {r['first_s']:.2f} s | "
                        f"text {s['text']:.1f} ms, UNet step {s['unet_step']:.1f} ms, VAE {s['vae']:.1f} ms, "
                        f"vocoder {s['vocoder']:.1f} ms, host glue {s['host_glue']:.1f} ms; cold start "
                        f"{r['cold_start_s']:.1f} s; peak GPU memory +{r['peak_gpu_mib']:.0f} MiB"
                        + (f"; without a CUDA graph: {', '.join(r['without_cuda_graphs'])}"
                           if r.get("without_cuda_graphs") and r.get("cuda_graphs") is not False else "") + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp16", help="fp16 artefact folder")
    ap.add_argument("--fp32", help="fp32 artefact folder")
    ap.add_argument("--fp16-plain", help="fp16 artefact folder exported with --fuse none")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma-separated: b0,b1,b2,fp16,fp32,fp16_nograph,fp16_notf32,fp16_plain,"
                                               "fp16_host_loop")
    ap.add_argument("--provider-options", type=json.loads, default=None, metavar="JSON",
                    help='adds a row: the --fp16 artefacts with these per-component CUDA provider options, '
                         'e.g. \'{"unet": {"sdpa_kernel": 19}}\'')
    ap.add_argument("--packed-all", action="store_true",
                    help="the runtime rows pack every component's weights that allows it (load(packed_weights=True))")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    import onnxruntime
    import pynvml

    pynvml.nvmlInit()
    device = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    res = {"device": device if isinstance(device, str) else device.decode(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "versions": {"onnxruntime": onnxruntime.__version__}, "request": REQUEST, "skipped": sorted(skip),
           "provider_options": args.provider_options, "packed_all": args.packed_all}
    cublas_env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")

    def save() -> None:  # after every row: what a lost machine had done comes back (runs BV-BW)
        Path(args.out, "benchmark.json").write_text(json.dumps(res, indent=1))
        Path(args.out, "benchmark.md").write_text(table(res) + "\n")

    variants = (  # key, artefacts, cuda_graphs, heavy (DDIM-200, batch 4), tf32, provider_options, device_loop
        ("fp16", args.fp16, "auto", True, None, None, None), ("fp32", args.fp32, "auto", False, None, None, None),
        ("fp16_host_loop", args.fp16, "auto", True, None, None, False),
        ("fp16_nograph", args.fp16, False, False, None, None, None),
        ("fp16_notf32", args.fp16, "auto", False, False, None, None),
        ("fp16_plain", args.fp16_plain, "auto", False, None, None, None),
        ("fp16_options", args.fp16 if args.provider_options else None, "auto", False, None, args.provider_options, None))
    for key, folder, graphs, heavy, tf32, options, loop in variants:  # the runtime first: no torch CUDA context yet
        if folder and key not in skip and not Path(folder, "manifest.json").exists():
            print(f"{key}: no artefacts in {folder} (export failed or was stopped); skipped", flush=True)
            res["skipped"].append(key)
        elif folder and key not in skip:
            try:
                res[f"runtime_{key}"] = bench_runtime(folder, args.runs, heavy=heavy, cuda_graphs=graphs, tf32=tf32,
                                                      provider_options=options, device_loop=loop,
                                                      packed_weights=True if args.packed_all else None)
                print(key, json.dumps(res[f"runtime_{key}"]["stages_ms"]), res[f"runtime_{key}"]["median_s"], flush=True)
            except Exception as err:  # one configuration failing (a provider option cuDNN rejects) ends only its row
                res[f"runtime_{key}"] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
                print(key, "failed:", res[f"runtime_{key}"]["error"], flush=True)
            save()
    # The runtime set CUBLAS_WORKSPACE_CONFIG for its sessions (unless it was set when this ran): the peers run as
    # they do out of the box, with torch's own cuBLAS workspace.
    if cublas_env_before is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    import torch

    import diffusers
    import transformers

    res["versions"].update(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__)
    if "b0" not in skip:
        res["diffusers"] = {}
        bench_diffusers(args.runs, skip, res["diffusers"], save)
    save()
    print(table(res))


if __name__ == "__main__":
    main()
