"""Latency of one artefact folder on one device (``audioldm2-trt bench``): load, first call, warm calls by stage.

Measures this runtime alone, with nothing but the runtime's own dependencies; ``scripts/benchmark.py`` runs the
diffusers peers (eager and ``torch.compile``d) beside it in one process, which needs torch. Every timed call returns
its audio to the host, so each wall-clock time covers the GPU work it launched; the denoising loop reads each step's
finiteness flags back to the host once the step has run (with the steps queued one ahead, while the next one runs),
so the per-step times are synchronised too. On CUDA it also reports the GPU's
used memory above its level before loading, as NVML reads it (``backends/nvml.py``, the scripts' measure too).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from .backends.nvml import GpuMemory
from .errors import BackendError, InvalidRequestError

STAGES = ("text", "unet", "vae", "vocoder", "ranking")  # AudioLDM2Runtime.__call__(timings=...) keys, in order


@dataclass(frozen=True)
class BenchRequest:
    """One request, repeated: the benchmark's defaults are the speed issue's (10.24 s, DPM-Solver++ 20, CFG 3.5,
    a negative prompt, one waveform)."""

    prompt: str = "techno music with a strong upbeat tempo and high melodic riffs"
    negative_prompt: str | None = "low quality, noisy"
    steps: int = 20
    guidance: float = 3.5
    seconds: float | None = 10.24
    waveforms: int = 1
    scheduler: str = "dpmsolver++"
    seed: int = 0

    def kwargs(self) -> dict:
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, num_inference_steps=self.steps,
                    guidance_scale=self.guidance, audio_length_in_s=self.seconds,
                    num_waveforms_per_prompt=self.waveforms, scheduler=self.scheduler, seed=self.seed)


def sessions_without_cuda_graphs(health: dict) -> list[str]:
    """The components that ran without a CUDA graph, sorted, from ``AudioLDM2Runtime.health()`` (on CUDA: those
    ``cuda_graphs`` left out, and any ONNX Runtime refused). A session that has not run yet (the ranking's, before
    a call with two or more waveforms) has no graph either, but nothing ran uncaptured there: it is not listed."""
    return sorted(name for name, c in health["components"].items() if c["graphs"] == 0 and c["runs"] > 0)


def stage_medians_ms(calls: list[dict]) -> dict[str, float]:
    """Median milliseconds per stage over calls, each a ``timings`` dict filled by ``AudioLDM2Runtime.__call__``:
    text, unet_step (over every step of every call), unet_total (the loop), vae, vocoder, ranking (when the calls
    ranked), host_glue (total minus the stages) and total."""
    if not calls:
        raise ValueError("no timed calls")

    def seconds(call: dict, key: str) -> float:
        value = call.get(key, 0.0)
        return sum(value) if isinstance(value, list) else value

    med = lambda values: statistics.median(values) * 1e3  # noqa: E731
    out = {"text": med([c["text"] for c in calls]),
           "unet_step": med([s for c in calls for s in c["unet"]]),
           "unet_total": med([seconds(c, "unet") for c in calls]),
           "vae": med([c["vae"] for c in calls]), "vocoder": med([c["vocoder"] for c in calls])}
    if all("ranking" in c for c in calls):
        out["ranking"] = med([c["ranking"] for c in calls])
    out["host_glue"] = med([c["total"] - sum(seconds(c, k) for k in STAGES) for c in calls])
    out["total"] = med([c["total"] for c in calls])
    return out


def time_requests(rt, request: BenchRequest, runs: int, after_first: Callable[[], None] | None = None) -> dict:
    """The first call (CUDA graphs are captured there), ``after_first()`` if given, then ``runs`` warm calls, each
    timed whole and by stage.

    Returns seconds: ``first_s``, ``median_s``, ``min_s``, ``max_s``, ``all_s``; ``stages_ms`` (stage_medians_ms of
    the warm calls); ``audio_s`` (seconds of audio per waveform)."""
    _check_runs(runs)
    t0 = time.perf_counter()
    out = rt(**request.kwargs())
    first = time.perf_counter() - t0
    if after_first is not None:
        after_first()
    walls, calls = [], []
    for _ in range(runs):
        timings: dict = {}
        t0 = time.perf_counter()
        rt(**request.kwargs(), timings=timings)
        walls.append(time.perf_counter() - t0)
        calls.append(timings)
    return {"first_s": first, "median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
            "all_s": walls, "runs": runs, "stages_ms": stage_medians_ms(calls),
            "audio_s": out.audios.shape[1] / out.sample_rate}


def bench(folder, device: str = "cpu", runs: int = 10, request: BenchRequest = BenchRequest(), **load_options) -> dict:
    """Load ``folder`` on ``device`` (``AudioLDM2Runtime.load`` options pass through), then ``time_requests``.

    Adds ``load_s``, ``cold_start_s`` (load + first call), the artefacts' precision, the device (and its GPU's name
    on CUDA), ONNX Runtime's version, which components ran without a CUDA graph and, on CUDA, ``gpu_memory_mib``:
    the GPU's used memory (NVML, the whole device, so other processes' allocations count too) above its level
    before loading — after load, and the peak. It is sampled through load and the first call, where the arenas
    grow, then read once after the warm calls, so that sampling does not run during their timing."""
    from .backends.base import Device
    from .pipeline import AudioLDM2Runtime

    _check_runs(runs)  # before seconds of loading
    dev = Device.parse(device)
    memory, memory_error = _gpu_memory(dev)
    if memory is not None:
        memory.start()
    try:
        t0 = time.perf_counter()
        rt = AudioLDM2Runtime.load(folder, device=dev, ranking=request.waveforms > 1, **load_options)
        load_s = time.perf_counter() - t0
        loaded_at = time.perf_counter()
        try:
            timed = time_requests(rt, request, runs, after_first=memory.stop if memory is not None else None)
            health = rt.health()
            if memory is not None:
                memory.read()  # after the warm calls, which ran unsampled
        finally:
            rt.close()
    finally:
        if memory is not None:
            memory.stop()  # still sampling only where load or the first call failed
    result = {"artifacts": str(folder), "precision": rt.artifacts.precision, "device": str(rt.device),
              "gpu": _gpu_name(rt.device), "onnxruntime": _onnxruntime_version(), "request": request.kwargs(),
              "load_s": load_s, "cold_start_s": load_s + timed["first_s"], **timed,
              "queued_steps": health["queued_steps"] if health["device_loop"] else None,
              "lm_loop": "queued" if health["lm_queued"] else "device" if health["lm_loop"] else "host",
              "weights_block_mib": {n: c["weights_block"] / 2**20 for n, c in health["components"].items()
                                    if c["weights_block"]},
              "shared_arena": health["shared_arena"],
              "cublas_workspace_config": health["cublas_workspace_config"],
              "without_cuda_graphs": sessions_without_cuda_graphs(health) if rt.device.kind == "cuda" else [],
              "gpu_memory_mib": None}
    if memory is not None:
        base = memory.samples[0][1]
        result["gpu_memory_mib"] = {"before_load": base, "after_load": memory.at(loaded_at) - base,
                                    "peak": memory.peak_mib - base}
    elif memory_error:
        result["gpu_memory_error"] = memory_error
    return result


def _gpu_memory(dev) -> tuple:
    """(GpuMemory of the device, None) on CUDA where NVML answers; (None, why not) on CUDA otherwise; (None, None) on
    the CPU. Memory is reported with the result, never a reason to stop the benchmark."""
    if dev.kind != "cuda":
        return None, None
    try:
        return GpuMemory(dev.index), None
    except BackendError as err:
        return None, str(err)


LM_LOOP_WORDS = {"queued": "on the device, queued", "device": "on the device, each waited for",
                 "host": "on the host"}


def report(result: dict) -> str:
    """The bench result as a few lines of text."""
    s = result["stages_ms"]
    req = result["request"]
    rows = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in s.items() if k != "total")
    gpu = f" ({result['gpu']})" if result.get("gpu") else ""
    ort = f", onnxruntime {result['onnxruntime']}" if result.get("onnxruntime") else ""
    lines = [
        f"{result['artifacts']}: {result['precision']} on {result['device']}{gpu}{ort}",
        f"request: {result['audio_s']:.2f} s of audio, {req['scheduler']} {req['num_inference_steps']} steps, "
        f"CFG {req['guidance_scale']}, {req['num_waveforms_per_prompt']} waveform(s) per prompt",
        f"load {result['load_s']:.2f} s, first call {result['first_s']:.2f} s, cold start {result['cold_start_s']:.2f} s",
        f"end to end over {result['runs']} warm calls: median {result['median_s'] * 1e3:.1f} ms "
        f"(min {result['min_s'] * 1e3:.1f}, max {result['max_s'] * 1e3:.1f}); "
        f"{result['audio_s'] * req['num_waveforms_per_prompt'] / result['median_s']:.1f} s of audio per second",
        f"stages, median ms: {rows}",
    ]
    if result.get("queued_steps") is not None:
        lines.append(f"denoising steps {'queued one ahead' if result['queued_steps'] else 'each waited for'}")
    if result.get("lm_loop"):
        lines.append(f"GPT-2's passes: {LM_LOOP_WORDS[result['lm_loop']]}")
    if result.get("weights_block_mib"):
        lines.append("weights in a block of the runtime's own: " + ", ".join(
            f"{name} {mib:.0f} MiB" for name, mib in result["weights_block_mib"].items()))
    if result.get("shared_arena") is not None:
        lines.append("on the shared ONNX Runtime arena: " + (", ".join(result["shared_arena"]) or "none"))
    if result.get("cublas_workspace_config"):
        lines.append(f"cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG): {result['cublas_workspace_config']}")
    mem = result.get("gpu_memory_mib")
    if mem:
        lines.append(f"GPU memory (NVML, whole device, above {mem['before_load']:.0f} MiB in use before load): "
                     f"+{mem['after_load']:.0f} MiB after load, peak +{mem['peak']:.0f} MiB")
    elif result.get("gpu_memory_error"):
        lines.append(f"GPU memory not measured: {result['gpu_memory_error']}")
    if result["without_cuda_graphs"]:
        lines.append(f"without a CUDA graph: {', '.join(result['without_cuda_graphs'])}")
    return "\n".join(lines)


def _check_runs(runs) -> None:
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise InvalidRequestError(f"runs must be an integer ≥ 1, got {runs!r}")


def _gpu_name(device) -> str | None:
    if device.kind != "cuda":
        return None
    from .backends.cuda_driver import device_name

    return device_name(device.index)


def _onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except ModuleNotFoundError:  # the "trt" backend needs no ONNX Runtime
        return None
    return onnxruntime.__version__
