"""More than one GPU: placement of a runtime on a chosen GPU, and Ray Serve scale-out over the GPUs of a host.

    python scripts/multi_gpu.py placement --artifacts /tmp/art-fp16 [--out DIR]        # needs 2 GPUs
    python scripts/multi_gpu.py ray --artifacts /tmp/art-fp16 --replicas 1 2 [--concurrency 1 4 16 32]
                                    [--device cuda|cpu] [--out DIR]

placement: the calling thread makes GPU 0's primary context current (as a server doing its own CUDA work on
GPU 0 would), then loads a runtime on ``cuda:1`` and generates. Reports each GPU's used memory (NVML) before and
after, whether the thread's current context is still GPU 0's, the cuda:1 vs cuda:0 output (mel relative L2, the
fidelity measure), and two runtimes on the two GPUs driven from two threads at once against each alone.

ray: one Ray Serve application per replica count (one GPU per replica), the runtime's own micro-batching inside
each replica; a load generator in this process with ``c`` client threads, each sending requests back to back
through the deployment handle (10.24 s, DPM-20, CFG 3.5, a different prompt and seed per request). One untimed
round first, then max(8, rounds × c) timed requests (``--rounds``, default 3). Reports seconds of audio per second and p50 / p95 latency.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import threading
from pathlib import Path

import numpy as np

from load_test import prompt_for, run_load

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
    alone = {0: rt0("rain on a tin roof", seed=1, **REQUEST).audios, 1: rt1("a jazz piano solo", seed=2, **REQUEST).audios}
    together: dict = {}

    def drive(i, rt, prompt, seed):
        together[i] = [rt(prompt, seed=seed, **REQUEST).audios for _ in range(3)]

    threads = [threading.Thread(target=drive, args=(0, rt0, "rain on a tin roof", 1)),
               threading.Thread(target=drive, args=(1, rt1, "a jazz piano solo", 2))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    worst = max(float(np.linalg.norm(x - alone[i]) / np.linalg.norm(alone[i])) for i in together for x in together[i])
    return {"gpu_used_mib_before": before, "gpu_used_mib_after_cuda1_load_and_call": after_gpu1,
            "delta_mib": [a - b for a, b in zip(after_gpu1, before)],
            "caller_context_still_gpu0": still_gpu0,
            "cuda1_vs_cuda0_mel_rel_l2": mel_rel_l2(out1, out0),
            "cuda1_vs_cuda0_waveform_max_abs": float(np.abs(out1 - out0).max()),
            "two_gpus_two_threads_worst_rel_l2_vs_alone": worst, "health_cuda1": rt1.health()}


def ray_scaleout(folder: str, replicas: list[int], concurrency: list[int], device: str, max_batch: int,
                 out: Path, rounds: int = 3) -> list[dict]:
    import ray
    from ray import serve

    from audioldm2_trt.runtime.ray_serve import build_app

    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for r in replicas:
            handle = serve.run(build_app(folder, num_replicas=r, device=device, max_batch=max_batch),
                               name=f"audioldm2-{r}", route_prefix=None)

            def send(i, handle=handle):
                handle.generate.remote({"prompt": prompt_for(i), "seed": i, "steps": 20, "guidance": 3.5,
                                        "seconds": SECONDS, "negative_prompt": REQUEST["negative_prompt"]}).result()

            first = 0
            for c in concurrency:
                run_load(send, c, c, first, SECONDS)  # untimed: CUDA graphs for the batch sizes this load produces
                first += c
                total = max(8, rounds * c)
                row = {"replicas": r, **run_load(send, c, total, first, SECONDS)}
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
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=SECONDS, help="audio length of every request")
    ap.add_argument("--rounds", type=int, default=3, help="timed requests per level: max(8, rounds × concurrency)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    SECONDS = REQUEST["audio_length_in_s"] = args.seconds
    out = Path(args.out)
    if args.what == "placement":
        res = placement(args.artifacts)
        (out / "placement.json").write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != "health_cuda1"}, indent=1))
    else:
        ray_scaleout(args.artifacts, args.replicas, args.concurrency, args.device, args.max_batch, out, args.rounds)


if __name__ == "__main__":
    main()
