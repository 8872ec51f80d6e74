"""Serving load on one GPU: throughput and latency of the micro-batcher at several concurrencies.

    python scripts/load_test.py --artifacts /tmp/art-fp16 [--device cuda] [--concurrency 1 4 16] [--shared-arena] [--out DIR]

Each configuration: ``c`` client threads each sending requests back to back (10.24 s, DPM-20, CFG 3.5,
a different prompt and seed per request) through one ``MicroBatcher`` — with micro-batching
(max_batch 16 rows) and without (max_batch 1). One untimed round first (captures the CUDA graphs of
the batch sizes that occur), then 3 × c requests (at least 8) timed. Reports seconds of audio per second
and p50 / p95 latency. Also checks placement: an explicit ``cuda:N`` runtime, and two runtimes on the
same GPU driven from two threads at once, each equal to its result alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from audioldm2_trt.runtime.cli import shared_arena_value

SECONDS = 10.24
MAX_BATCH = 16  # rows per micro-batch when batching is on


def prompt_for(i: int) -> str:
    return f"sound number {i}: rain, thunder and a dog barking"


def run_load(send, concurrency: int, total: int, first: int = 0, seconds: float = SECONDS) -> dict:
    """``concurrency`` client threads call ``send(i)`` back to back for i = first … first + total − 1, each a
    request for ``seconds`` of audio; seconds of audio per second and p50 / p95 latency."""
    latencies, lock = [], threading.Lock()
    counter = iter(range(first, first + total))

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            send(i)
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": total, "wall_s": wall, "audio_s_per_s": total * seconds / wall,
            "p50_s": statistics.median(latencies), "p95_s": float(np.percentile(latencies, 95))}


def worst_together_vs_alone(calls: dict, repeats: int) -> float:
    """calls: key → a zero-argument call returning audio. Each call once alone, then every key driven from a
    thread of its own at once, ``repeats`` times each; the worst relative L2 of a together result against its
    result alone."""
    alone = {k: call() for k, call in calls.items()}
    together = {}

    def drive(key):
        together[key] = [calls[key]() for _ in range(repeats)]

    threads = [threading.Thread(target=drive, args=(k,)) for k in calls]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return max(float(np.linalg.norm(x - alone[k]) / np.linalg.norm(alone[k])) for k in together for x in together[k])


def worst_repeat_vs_first(call, repeats: int = 5) -> float:
    """One caller, one thread: the worst relative L2 of ``repeats`` later results against the first (0.0 for a
    deterministic pipeline; a run-to-run difference here is not cross-talk between threads)."""
    first = call()
    return max(float(np.linalg.norm(call() - first) / np.linalg.norm(first)) for _ in range(repeats))


class TorchGpuLoad:
    """A context: a thread keeps the GPU busy with torch fp16 matmuls and small element-wise kernels on its own
    stream. No ONNX Runtime memory or stream is shared with it, so a runtime whose results change beside it is
    sensitive to kernel scheduling (e.g. atomics' order), not corrupted by another runtime."""

    def __init__(self, device: str):
        self.device = device
        self._stop = threading.Event()

    def __enter__(self):
        import torch

        self._thread = threading.Thread(target=self._spin, args=(torch,), daemon=True)
        self._thread.start()
        time.sleep(0.5)
        return self

    def _spin(self, torch) -> None:
        dev = torch.device(self.device)
        with torch.cuda.stream(torch.cuda.Stream(dev)):
            a = torch.randn(2048, 2048, device=dev, dtype=torch.float16)
            small = torch.randn(4096, device=dev)
            while not self._stop.is_set():
                for _ in range(8):
                    a = torch.tanh(a @ a * 1e-3)
                    small = small * 0.999 + 1e-3
                torch.cuda.synchronize(dev)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def placement(folder: str, device: str, shared_arena=None) -> dict:
    """Two runtimes on one GPU from two threads against each alone, for the device loop (the default) and the loop
    on the host; each runtime's repeats alone, which tell run-to-run nondeterminism from cross-talk; and one
    runtime repeated beside an unrelated torch workload (where torch is installed), which tells sensitivity to
    kernel scheduling (a difference with nothing shared) from cross-talk between runtimes. All four runtimes are
    loaded before any runs: with ``shared_arena`` they share one arena, which no session may join after a capture."""
    from audioldm2_trt.runtime import AudioLDM2Runtime

    kwargs = dict(num_inference_steps=5, audio_length_in_s=2.0)
    out = {"device": device, "shared_arena": shared_arena}
    loops = (("", None), ("host_loop_", False))
    pairs = {label: [AudioLDM2Runtime.load(folder, device=device, device_loop=loop, shared_arena=shared_arena)
                     for _ in range(2)] for label, loop in loops}
    # what each has on the shared arena (load's default on CUDA: the decode stage's, if nothing has served yet)
    out["on_arena"] = {label: [rt.health()["shared_arena"] for rt in pair] for label, pair in pairs.items()}
    for label, _ in loops:
        a, b = pairs[label]
        call_a, call_b = (lambda: a("a dog", seed=1, **kwargs).audios), (lambda: b("rain", seed=2, **kwargs).audios)
        call_a(), call_b()  # shapes captured before anything is compared
        out[f"{label}one_runtime_repeated_alone_worst_rel_l2"] = worst_repeat_vs_first(call_a)
        out[f"{label}two_runtimes_two_threads_worst_rel_l2"] = worst_together_vs_alone({"a": call_a, "b": call_b},
                                                                                      repeats=5)
        if device.startswith("cuda") and _has_torch():
            first = call_a()
            with TorchGpuLoad(device):
                beside = [call_a() for _ in range(5)]
            out[f"{label}one_runtime_beside_torch_load_worst_rel_l2"] = max(
                float(np.linalg.norm(x - first) / np.linalg.norm(first)) for x in beside)
        a.close(), b.close()
    return out


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-placement", action="store_true")
    ap.add_argument("--placement-only", action="store_true", help="the placement checks, no load")
    ap.add_argument("--shared-arena", nargs="?", const=True, default=None, type=shared_arena_value,
                    metavar="default|all|none|NAME,NAME...",
                    help="every runtime loaded with this shared_arena (load's; on CUDA captured sessions only "
                         "among the decode stage's, docs/benchmarks.md runs BD-BN): all (the flag alone), none, "
                         "component names, or load's default (on CUDA the decode stage's)")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from audioldm2_trt.runtime import AudioLDM2Runtime, MicroBatcher
    from audioldm2_trt.runtime.shapes import WARM_T5_BUCKETS, batch_buckets

    res = {"placement": "skipped", "shared_arena": args.shared_arena}
    # loaded before the placement runtimes capture anything (a shared arena takes no session after a capture)
    rt = None if args.placement_only else AudioLDM2Runtime.load(args.artifacts, device=args.device,
                                                                shared_arena=args.shared_arena)
    if rt is not None:
        res["on_arena"] = rt.health()["shared_arena"]
    if not args.skip_placement:
        try:
            res["placement"] = placement(args.artifacts, args.device + ":0" if args.device == "cuda" else args.device,
                                         shared_arena=args.shared_arena)
        except Exception as err:  # reported, and the load figures still measured
            res["placement"] = {"error": f"{type(err).__name__}: {err}"}
    print(res, flush=True)
    if args.placement_only:
        Path(args.out, "load.json").write_text(json.dumps(res, indent=1))
        return
    # every bucket the batcher can produce, at the T5 buckets a server warms
    rt.warmup(lengths_s=(SECONDS,), batch_sizes=batch_buckets(MAX_BATCH), t5_buckets=WARM_T5_BUCKETS)
    res["load"] = []
    for batching in (False, True):
        batcher = MicroBatcher(rt, max_batch=MAX_BATCH if batching else 1, max_wait_s=0.01, max_queue=256)

        def send(i, batcher=batcher):
            batcher.generate(prompt_for(i), seed=i, num_inference_steps=20, guidance_scale=3.5,
                             audio_length_in_s=SECONDS, timeout=600)

        for c in args.concurrency:
            run_load(send, c, c)  # untimed: graphs for the batch sizes this concurrency produces
            row = {"batching": batching, **run_load(send, c, max(8, 3 * c)),
                   "batches": batcher.batches_run, "rows": batcher.rows_run}
            res["load"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out, "load.json").write_text(json.dumps(res, indent=1))
        batcher.close()
    res["health"] = rt.health()
    Path(args.out, "load.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
