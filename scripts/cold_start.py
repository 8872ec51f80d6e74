"""Cold start in clean processes: session creation + the first audio, with artefacts already built.

    python scripts/cold_start.py --artifacts /tmp/art-fp16 --variants default,conv_heuristic --repeat 2 --out DIR

Each (variant, repeat) runs in a fresh Python process (``--child``), so no variant inherits another's CUDA
context, cuDNN handles or plans. A child reports: load (every session created, ``create_all``), the first call
(stage by stage: text, each UNet step, VAE, vocoder) and the median of 5 warm calls (what the variant costs
in speed), and the GPU memory used (NVML, MiB over the process's start) after load, the first call and the
warm calls. The variant ``sequential`` creates the sessions one at a time and reports each one's creation time
and memory. On CUDA every variant but ``host_loop`` keeps the denoising loop on the device, as
``AudioLDM2Runtime.load`` does (runs before 2026-11-26 18:00 UTC measured the loop on the host).
Writes cold_start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

# scripts/gpu_memory.py imports the runtime's small NVML module (ctypes; with it the package and its errors) before
# the import timed below, which is the pipeline's, ONNX Runtime's and the backends' — at most ~3 ms less than before
# 2026-11-27, when gpu_memory.py read NVML through pynvml (importing that module alone takes ~3 ms on the CPU machine)
from gpu_memory import GpuMemory

REQUEST = dict(prompt="techno music with a strong upbeat tempo and high melodic riffs",
               negative_prompt="low quality, noisy", num_inference_steps=20, guidance_scale=3.5,
               audio_length_in_s=10.24)
CONVS = ("unet", "vae_decoder", "vocoder")
# audioldm2_trt.runtime.artifacts.COMPONENTS, not imported here: the child measures the runtime's import
COMPONENTS = ("clap_text", "t5_encoder", "projection", "gpt2", "unet", "vae_decoder", "vocoder", "clap_features",
              "clap_audio")
CACHE = "/tmp/ort-optimized-cache"
# name: (provider_options, graph optimisation level, sequential creation, optimised-graph cache)
# cache_write optimises and writes every graph to CACHE (run it before cache_read, which loads them unoptimised).
VARIANTS = {
    "default": (None, "all", False, None),
    "sequential": (None, "all", True, None),
    "seq_disable": (None, "disable", True, None),
    "conv_heuristic": ({c: {"cudnn_conv_algo_search": "HEURISTIC"} for c in CONVS}, "all", False, None),
    "conv_heuristic_uv": ({c: {"cudnn_conv_algo_search": "HEURISTIC"} for c in CONVS[:2]}, "all", False, None),
    # the default before 2026-11-26 15:40 (HEURISTIC for the UNet and the VAE decoder since)
    "conv_exhaustive_uv": ({c: {"cudnn_conv_algo_search": "EXHAUSTIVE"} for c in CONVS[:2]}, "all", False, None),
    "opt_basic": (None, "basic", False, None),
    "cache_write": (None, "all", True, CACHE),
    "cache_read": (None, "all", True, CACHE),
    # every session's arena grows by what it is asked for instead of the next power of two — which is what
    # cuda_provider_options sets for every session already: the same as "default" (kept to show that it is)
    "arena_same": ({c: {"arena_extend_strategy": "kSameAsRequested"} for c in COMPONENTS}, "all", False, None),
    # the denoising loop on the host (runs before 2026-11-26 18:00 did)
    "host_loop": (None, "all", False, None),
    # cuDNN convolutions limited to their default workspace instead of the largest (GPU memory vs speed)
    "conv_small_workspace": ({c: {"cudnn_conv_use_max_workspace": 0} for c in CONVS}, "all", False, None),
    # initializers allocated with the device allocator, outside each session's arena
    "init_outside_arena": (None, "all", False, None),
    # Where the first call's fixed GPU memory goes (VARIANT_EXTRAS; no_graphs in FACTORY_VARIANTS): every kernel
    # module loaded at context creation instead of on first use; cuBLAS's own workspace at 4 MiB; no ranking sessions
    # (CLAP audio and its features; a batch-1 request never runs them)
    "eager_modules": (None, "all", True, None),
    "cublas_small_ws": (None, "all", True, None),
    "no_ranking": (None, "all", True, None),
    # each convolution's bias in cuDNN's fused conv + bias engine (the vocoder's dilated 1-D convolutions fail so)
    "fuse_unet": ({"unet": {"fuse_conv_bias": 1}}, "all", False, None),
    "fuse_unet_vae": ({c: {"fuse_conv_bias": 1} for c in CONVS[:2]}, "all", False, None),
    # the vocoder without cuDNN's exhaustive algorithm search (2.6 s of run K's first call), or with its heuristic
    "voc_default_search": ({"vocoder": {"cudnn_conv_algo_search": "DEFAULT"}}, "all", False, None),
    "voc_heuristic": ({"vocoder": {"cudnn_conv_algo_search": "HEURISTIC"}}, "all", False, None),
}
# Variants that change more than provider options. env: set in the child's environment before CUDA starts;
# factory: OrtSessionFactory arguments; skip: components whose session is not created.
VARIANT_EXTRAS = {
    "eager_modules": {"env": {"CUDA_MODULE_LOADING": "EAGER"}},
    "cublas_small_ws": {"env": {"CUBLAS_WORKSPACE_CONFIG": ":4096:1"}},  # the runtime's default since run I
    "no_ranking": {"skip": ("clap_features", "clap_audio")},
}
# Variants that change only OrtSessionFactory arguments, sessions created one at a time (as "sequential", whose
# memory figures they are compared with): name → arguments.
FACTORY_VARIANTS = {
    "no_graphs": {"cuda_graphs": False},  # no CUDA graph captured
    # cuBLAS's own default workspace (the runtime asks for less per handle since run I: CUBLAS_WORKSPACE_KIB)
    "cublas_default_ws": {"cublas_workspace_kib": None},
    # ONNX Runtime's memory pattern off (activations allocated tensor by tensor instead of one planned block per
    # run) — the default on CUDA since run N; mem_pattern_on: the default before. (Every variant has the default's
    # decode stage on the shared arena since run BN.)
    "nopattern": {"mem_pattern": False},
    "mem_pattern_on": {"mem_pattern": True},
    # every session's weights in allocations of their own (ONNX Runtime's default; the runtime's until packed weights)
    "unpacked": {"packed_weights": False},
}
VARIANTS.update({name: (None, "all", True, None) for name in FACTORY_VARIANTS})
VARIANT_EXTRAS.update({name: {"factory": args} for name, args in FACTORY_VARIANTS.items()})


def _gpu_memory(interval_s: float = 0.001):
    """A ``GpuMemory`` of GPU 0 (sampling about every millisecond in a ``with``), or None off the GPU / without
    pynvml."""
    try:
        return GpuMemory(interval_s=interval_s)
    except Exception:
        return None


def growth_by_stage(timeline: GpuMemory, start: float, stages: dict) -> dict:
    """MiB the used memory grew in each stage of one call, from the call's start and its ``timings`` (durations:
    text, unet [per step], vae, vocoder; host glue in between is counted in the next stage)."""
    bounds = [("text", stages["text"]), ("unet step 1", stages["unet"][0]),
              ("unet steps 2…", sum(stages["unet"][1:])), ("vae", stages["vae"]), ("vocoder", stages["vocoder"])]
    out, t, level = {}, start, timeline.at(start)
    for name, seconds in bounds:
        t += seconds
        now = timeline.at(t)
        out[name] = round(now - level, 1)
        level = now
    out["after"] = round(timeline.samples[-1][1] - level, 1)
    return out


def child(folder: str, variant: str, device: str, audio_file: str | None = None) -> dict:
    probe = _gpu_memory()
    base = probe.used_mib() if probe is not None else None
    used = lambda: None if probe is None else probe.used_mib() - base  # noqa: E731
    t_import = time.perf_counter()
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.artifacts import load_artifacts
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory
    from audioldm2_trt.runtime.backends.ort_options import default_tf32
    from audioldm2_trt.runtime.pipeline import SOLVER_STEP_GRAPH

    imported = time.perf_counter() - t_import
    options, level, sequential, cache = VARIANTS[variant]
    extras = VARIANT_EXTRAS.get(variant, {})
    if variant == "cache_write":
        import shutil

        shutil.rmtree(CACHE, ignore_errors=True)
    t0 = time.perf_counter()
    art = load_artifacts(folder)
    device_loop = variant != "host_loop" and device.startswith("cuda")  # as AudioLDM2Runtime.load decides
    factory = OrtSessionFactory.for_artifacts(art, device, component_options=options, tf32=default_tf32(art.precision),
                                              graph_optimization=level, optimized_cache=cache,
                                              bind=True if device_loop else None,
                                              session_config={"session.use_device_allocator_for_initializers": "1"}
                                              if variant == "init_outside_arena" else None,
                                              **extras.get("factory", {}))
    files = art.session_files(name for name in art.manifest["components"] if name not in extras.get("skip", ()))
    created, memory = {}, {}
    if sequential:
        sessions = {}
        for name, path in files.items():
            t = time.perf_counter()
            sessions[name] = factory.create(name, path)
            created[name] = time.perf_counter() - t
            memory[f"after creating {name}"] = used()
    else:
        sessions = factory.create_all(files)
    solver = factory.create("solver_step", SOLVER_STEP_GRAPH, graphs=False) if device_loop else None
    rt = AudioLDM2Runtime(art, sessions, factory.device, solver)
    load = time.perf_counter() - t0
    memory["after load"] = used()
    first: dict = {}
    timeline = _gpu_memory()
    with timeline or nullcontext():
        t1 = time.perf_counter()
        audio = rt(**REQUEST, seed=0, timings=first).audios
        first_call = time.perf_counter() - t1
    if audio_file:
        import numpy as np

        np.save(audio_file, audio)
    memory["after the first call"] = used()
    if timeline is not None:
        memory["first call, growth by stage"] = growth_by_stage(timeline, t1, first)
    warm = []
    for _ in range(5):
        t = time.perf_counter()
        rt(**REQUEST, seed=0)
        warm.append(time.perf_counter() - t)
    memory["after 5 more calls"] = used()
    stages = {k: (v if not isinstance(v, list) else [round(x, 4) for x in v]) for k, v in first.items()}
    return {"variant": variant, "device_loop": device_loop, "import_s": imported, "load_s": load, "first_call_s": first_call,
            "cold_start_s": load + first_call, "first_call_stages_s": stages, "create_s": created,
            "gpu_used_mib": memory,
            "warm_median_s": statistics.median(warm)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--variants", default="default,sequential,seq_disable,cache_write,cache_read,conv_heuristic_uv")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--audio-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.child:
        print("RESULT " + json.dumps(child(args.artifacts, args.child, args.device, args.audio_file)), flush=True)
        return
    rows, first_audio = [], None
    for r in range(args.repeat):  # interleaved: variant A, B, …, then again
        for variant in args.variants.split(","):
            env = {**os.environ, **VARIANT_EXTRAS.get(variant, {}).get("env", {})}
            audio_file = Path(args.out, f"audio-{variant}-{r}.npy")
            proc = subprocess.run([sys.executable, __file__, "--artifacts", args.artifacts, "--device", args.device,
                                   "--child", variant, "--audio-file", str(audio_file)],
                                  capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            row = json.loads(line[0][7:]) if line else {"variant": variant, "error": proc.stderr[-2000:]}
            row["repeat"] = r
            if line:
                first_audio = first_audio or audio_file
                row["audio_rel_l2_vs_first_row"] = audio_rel_l2(audio_file, first_audio)
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("variant", "repeat", "load_s", "first_call_s", "cold_start_s",
                                                      "warm_median_s", "error")}), flush=True)
            Path(args.out, "cold_start.json").write_text(json.dumps({
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "artifacts": args.artifacts,
                "request": REQUEST, "rows": rows}, indent=1))


def audio_rel_l2(audio_file: Path, first_file: Path) -> float:
    """rel-L2 of the first call's audio (seed 0) saved at ``audio_file`` against the first row's, at ``first_file``
    (0.0 for the first row itself): a variant that changes the audio beyond the fp16 UNet's run-to-run spread (~2e-3)
    shows here."""
    import numpy as np

    this, first = np.load(audio_file), np.load(first_file)
    return float(np.linalg.norm(this - first) / np.linalg.norm(first))


if __name__ == "__main__":
    main()
