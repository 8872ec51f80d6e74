"""More than one GPU: placement of a runtime on a chosen GPU, and Ray Serve scale-out over the GPUs of a host.

    python scripts/multi_gpu.py placement --artifacts /tmp/art-fp16 [--out DIR]        # needs 2 GPUs
    python scripts/multi_gpu.py ray --artifacts /tmp/art-fp16 --replicas 1 2 [--concurrency 1 4 8 16 32]
                                    [--device cuda|cpu] [--max-batch 8] [--max-ongoing N] [--out DIR]

placement: the calling thread makes GPU 0's primary context current (as a server doing its own CUDA work on
GPU 0 would), then loads a runtime on ``cuda:1`` and generates. Reports each GPU's used memory (NVML) before and
after, whether the thread's current context is still GPU 0's, the cuda:1 vs cuda:0 output (mel relative L2, the
fidelity measure), and two runtimes on the two GPUs driven from two threads at once against each alone.

ray: one Ray Serve application per replica count (one GPU per replica), the runtime's own micro-batching inside
each replica; a load generator in this process with ``c`` client threads, each sending requests back to back
through the deployment handle (10.24 s, DPM-20, CFG 3.5, a different prompt and seed per request). One untimed
round first, then max(8, rounds × c) timed requests (``--rounds``, default 3). Reports seconds of audio per second and
p50 / p95 latency, and a profile of each timed level (``LevelProfile``): per replica (found through its health call)
the batches and rows it ran, the share of the level its batcher worker was busy denoising/decoding, the seconds its
requests spent in the text stage and the CPU its process used; per GPU the NVML utilisation; the host's busy cores.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from load_test import prompt_for, run_load, worst_together_vs_alone

SECONDS = 10.24
REQUEST = dict(negative_prompt="low quality, noisy", num_inference_steps=20, guidance_scale=3.5,
               audio_length_in_s=SECONDS)


def gpu_used_mib() -> list[float]:
    import pynvml

    pynvml.nvmlInit()
    return [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used / 2**20
            for i in range(pynvml.nvmlDeviceGetCount())]


def make_gpu0_current() -> int:
    """Retain GPU 0's primary context and make it current in this thread (driver API); returns its handle."""
    from audioldm2_trt.runtime.backends import cuda_driver

    lib = cuda_driver._libcuda()
    dev, ctx = ctypes.c_int(0), ctypes.c_void_p()
    assert lib.cuDeviceGet(ctypes.byref(dev), 0) == 0
    assert lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
    assert lib.cuCtxSetCurrent(ctx) == 0
    return ctx.value


def mel_rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    from fidelity import mel, rel_l2  # scripts/ is on the path of a script run from it

    return float(rel_l2(mel(a.astype(np.float64)), mel(b.astype(np.float64))).max())


def placement(folder: str) -> dict:
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.backends import cuda_driver

    gpu0 = make_gpu0_current()
    before = gpu_used_mib()
    if len(before) < 2:
        raise SystemExit(f"placement needs 2 GPUs; NVML sees {len(before)}")
    rt1 = AudioLDM2Runtime.load(folder, device="cuda:1")
    out1 = rt1("a dog barking in the rain", seed=0, **REQUEST).audios
    after_gpu1 = gpu_used_mib()
    still_gpu0 = cuda_driver.current_context() == gpu0
    rt0 = AudioLDM2Runtime.load(folder, device="cuda:0")
    out0 = rt0("a dog barking in the rain", seed=0, **REQUEST).audios
    worst = worst_together_vs_alone({0: lambda: rt0("rain on a tin roof", seed=1, **REQUEST).audios,
                                     1: lambda: rt1("a jazz piano solo", seed=2, **REQUEST).audios}, repeats=3)
    return {"gpu_used_mib_before": before, "gpu_used_mib_after_cuda1_load_and_call": after_gpu1,
            "delta_mib": [a - b for a, b in zip(after_gpu1, before)],
            "caller_context_still_gpu0": still_gpu0,
            "cuda1_vs_cuda0_mel_rel_l2": mel_rel_l2(out1, out0),
            "cuda1_vs_cuda0_waveform_max_abs": float(np.abs(out1 - out0).max()),
            "two_gpus_two_threads_worst_rel_l2_vs_alone": worst, "health_cuda1": rt1.health()}


def _host_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all host CPUs since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its finished children's (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def replica_health(handle, replicas: int, probes: int = 64) -> dict[int, dict]:
    """pid → health of each replica: health calls one after another (the router picks a replica for each;
    calls sent all at once were seen to land on one replica) until ``replicas`` pids answered or ``probes`` calls."""
    found: dict[int, dict] = {}
    for _ in range(probes):
        answer = handle.health.remote().result()
        found[answer["pid"]] = answer
        if len(found) == replicas:
            break
    return found


class LevelProfile:
    """Where one load level's time went: replica counters before/after, NVML utilisation sampled every 0.1 s
    per GPU, the host's busy cores, each replica process's CPU."""

    def __init__(self, handle, replicas: int):
        self.handle, self.replicas = handle, replicas

    def __enter__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            gpus = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no NVML (a CPU-only run): no GPU figures
            gpus = []
        self.before = replica_health(self.handle, self.replicas)
        self.cpu_before = {pid: _process_cpu_s(pid) for pid in self.before}
        self.samples: list[list[int]] = []
        self.stop = threading.Event()

        def sample():
            while gpus and not self.stop.wait(0.1):
                self.samples.append([pynvml.nvmlDeviceGetUtilizationRates(g).gpu for g in gpus])

        self.sampler = threading.Thread(target=sample, daemon=True)
        self.host0, self.t0 = _host_cpu_ticks(), time.perf_counter()
        self.sampler.start()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        host1 = _host_cpu_ticks()
        self.stop.set()
        self.sampler.join()
        after = replica_health(self.handle, self.replicas)
        replicas = {}
        for pid, a in after.items():
            b = self.before.get(pid)
            if b is None:
                continue
            batches = a["batches_run"] - b["batches_run"]
            replicas[str(pid)] = {
                "cuda_visible_devices": a["cuda_visible_devices"], "batches": batches,
                "rows": a["rows_run"] - b["rows_run"],
                "mean_rows_per_batch": (a["rows_run"] - b["rows_run"]) / batches if batches else None,
                "batcher_busy_share": (a["busy_s"] - b["busy_s"]) / wall,
                "text_stage_s": a["prepare_s"] - b["prepare_s"],
                "process_cpu_cores": (_process_cpu_s(pid) - self.cpu_before[pid]) / wall,
                "unet_shapes": a["components"]["unet"]["shapes"], "unet_graphs": a["components"]["unet"]["graphs"]}
        util = np.array(self.samples, dtype=float) if self.samples else np.zeros((0, 0))
        self.result = {
            "profile_wall_s": wall, "replicas": replicas,
            "replicas_seen_before_or_after_only": sorted(set(map(str, self.before)) ^ set(map(str, after))),
            "gpu_util_mean_pct": util.mean(axis=0).round(1).tolist() if util.size else [],
            "host_busy_cores": (host1[0] - self.host0[0]) / max(1, host1[1] - self.host0[1]) * os.cpu_count()}
        return False


def ray_scaleout(folder: str, replicas: list[int], concurrency: list[int], device: str, max_batch: int,
                 out: Path, rounds: int = 3, max_ongoing: int | None = None) -> list[dict]:
    import ray
    from ray import serve

    from audioldm2_trt.runtime.ray_serve import build_app

    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for r in replicas:
            handle = serve.run(build_app(folder, num_replicas=r, device=device, max_batch=max_batch,
                                         max_ongoing_requests=max_ongoing),
                               name=f"audioldm2-{r}", route_prefix=None)

            def send(i, handle=handle):
                handle.generate.remote({"prompt": prompt_for(i), "seed": i, "steps": 20, "guidance": 3.5,
                                        "seconds": SECONDS, "negative_prompt": REQUEST["negative_prompt"]}).result()

            first = 0
            for c in concurrency:
                run_load(send, c, c, first, SECONDS)  # untimed: CUDA graphs for the batch sizes this load produces
                first += c
                total = max(8, rounds * c)
                with LevelProfile(handle, r) as prof:
                    row = {"replicas": r, "max_batch": max_batch, "max_ongoing_requests": max_ongoing or max_batch,
                       **run_load(send, c, total, first, SECONDS)}
                row["profile"] = prof.result
                first += total
                rows.append(row)
                print(json.dumps(row), flush=True)
                (out / "ray_load.json").write_text(json.dumps(rows, indent=1))
            serve.delete(f"audioldm2-{r}")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    global SECONDS
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["placement", "ray"])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    # 8: the two-replica p95 at 16 is compared with one replica's at half the load
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-ongoing", type=int, default=None, help="requests a replica holds (default: max-batch)")
    ap.add_argument("--seconds", type=float, default=SECONDS, help="audio length of every request")
    ap.add_argument("--rounds", type=int, default=3, help="timed requests per level: max(8, rounds × concurrency)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    SECONDS = REQUEST["audio_length_in_s"] = args.seconds
    out = Path(args.out)
    if args.what == "placement":
        res = placement(args.artifacts)
        (out / "placement.json").write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != "health_cuda1"}, indent=1))
    else:
        ray_scaleout(args.artifacts, args.replicas, args.concurrency, args.device, args.max_batch, out, args.rounds,
                     args.max_ongoing)


if __name__ == "__main__":
    main()
