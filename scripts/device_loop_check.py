"""The denoising loop on the device against the loop on the host, on CUDA, same artefacts, same requests; and the
device loop's steps queued one ahead (the default on CUDA) against each step waited for (``queued_steps=False``).

    python scripts/device_loop_check.py [--artifacts DIR] --out DIR

Without --artifacts it exports the tiny random pipeline first (seconds). For each request kind (negative
prompt, guidance 1.0, DDIM, 3 waveforms ranked, two prompts in one batch) both runtimes generate from the same
seed; the waveform relative L2 between them is reported (float32 solver step on the device vs float64 numpy
on the host: expect ~1e-6 in fp32, more where fp16 UNet outputs amplify it). Ranked requests also report it with each
prompt's waveforms matched to the closest order, and both sides' CLAP scores: with random weights the scores nearly
tie (2.6e-6 apart in run AH), so fp16 noise may swap two waveforms. The queued and step-by-step device loops run the
same graphs in the same order: their waveforms should be equal. One more case stops a loop in the middle: a batch of
two requests, the second cancelled by its own progress callback at step 7, so that the queued loop drops the step
it had queued and goes on with the first request alone; the first request's audio is compared with its run alone on
each loop. Writes device_loop_check.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

CASES = {
    "negative": dict(prompt="birds chirping in a forest", negative_prompt="low quality, noisy"),
    "guidance-1": dict(prompt="a dog barking", guidance_scale=1.0),
    "ddim": dict(prompt="thunder", scheduler="ddim", num_inference_steps=30),
    "three-waveforms": dict(prompt="an orchestra", num_waveforms_per_prompt=3),
    "two-prompts": dict(prompt=["thunder", "an orchestra playing a slow sad melody with violins"],
                        negative_prompt=["a", "b"]),
}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def matched_order(device: np.ndarray, host: np.ndarray, per_prompt: int) -> list[int]:
    """Device rows reordered, within each prompt's group, to the permutation closest to the host's rows (rel-L2)."""
    order = []
    for start in range(0, len(host), per_prompt):
        group = range(start, start + per_prompt)
        order += list(min(itertools.permutations(group), key=lambda p: rel_l2(device[list(p)], host[list(group)])))
    return order


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts")
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seconds", type=float, help="audio length (default 10.24 s with --artifacts, else 2 s)")
    ap.add_argument("--cancel-only", action="store_true", help="only the cancel-mid-loop case")
    ap.add_argument("--no-stream", action="store_true",
                    help="the device runtime with queued_steps=False too: no loop stream in the process")
    ap.add_argument("--cancel-runtimes", default="queued,stepwise,host",
                    help="the runtimes the cancel-mid-loop case runs, in this order")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from audioldm2_trt.runtime import AudioLDM2Runtime

    folder = args.artifacts
    if folder is None:
        from audioldm2_trt.export.onnx_export import export
        from audioldm2_trt.export.sources import Source

        folder = export(Source(random_config="tiny"), Path("/tmp/tiny-check"), overwrite=True)
    device = AudioLDM2Runtime.load(folder, device=args.device, device_loop=True,  # the default on CUDA
                                   **({"queued_steps": False} if args.no_stream else {}))
    host = AudioLDM2Runtime.load(folder, device=args.device, device_loop=False)
    stepwise = AudioLDM2Runtime.load(folder, device=args.device, device_loop=True, queued_steps=False)
    assert device._solver_step is not None and host._solver_step is None
    health = {"device": device.health()["queued_steps"], "stepwise": stepwise.health()["queued_steps"]}
    print("queued_steps:", health, flush=True)
    seconds = args.seconds or (10.24 if args.artifacts else 2.0)
    rows = {}
    for name, kw in ({} if args.cancel_only else CASES).items():
        kw = {"num_inference_steps": 20, "audio_length_in_s": seconds, "seed": 3, **kw}
        a, b, c = device(**kw), host(**kw), stepwise(**kw)
        rel = rel_l2(a.audios, b.audios)
        rows[name] = {"rel_l2_device_vs_host": rel, "finite": bool(np.isfinite(a.audios).all()),
                      "rms": float(np.sqrt((a.audios ** 2).mean())),
                      "rel_l2_queued_vs_stepwise": rel_l2(a.audios, c.audios),
                      "rel_l2_stepwise_repeat": rel_l2(stepwise(**kw).audios, c.audios)}
        if a.scores is not None:  # ranked: near-tied CLAP scores may order the same waveforms differently
            order = matched_order(a.audios, b.audios, kw.get("num_waveforms_per_prompt", 1))
            rows[name].update(rel_l2_rows_matched=rel_l2(a.audios[order], b.audios), same_order=order == sorted(order),
                              scores_device=a.scores.tolist(), scores_host=b.scores.tolist())
        print(name, json.dumps(rows[name]), flush=True)
    runtimes = {"queued": device, "stepwise": stepwise, "host": host}
    rows["cancel-mid-loop"] = cancel_mid_loop({k: runtimes[k] for k in args.cancel_runtimes.split(",")}, seconds)
    print("cancel-mid-loop", json.dumps(rows["cancel-mid-loop"]), flush=True)
    timing = {}
    for label, rt in () if args.cancel_only else (("device", device), ("stepwise", stepwise), ("host", host)):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            rt(**{**CASES["negative"], "num_inference_steps": 20, "seed": 0,
                  "audio_length_in_s": 10.24 if args.artifacts else 2.0})
            times.append(time.perf_counter() - t0)
        timing[label] = float(np.median(times))
    print("median of 5 (s):", timing, flush=True)
    Path(args.out, "device_loop_check.json").write_text(json.dumps(
        {"artifacts": str(folder), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "queued_steps": health, "cases": rows, "median_s": timing}, indent=1))


def cancel_mid_loop(runtimes: dict, seconds: float) -> dict:
    """Per loop: a batch of two requests, the second cancelled by its own callback at step 7 of 20; the first
    request's audio against its run alone on the same runtime, and against the host loop's batch."""
    import threading

    from audioldm2_trt.runtime.errors import RequestCancelled

    kw = dict(num_inference_steps=20, audio_length_in_s=seconds, negative_prompt="low quality")
    out, audio = {}, {}
    for label, rt in runtimes.items():
        cancel = threading.Event()
        items = [rt.prepare("rain on a tin roof", seed=11, **kw),
                 rt.prepare("a church bell", seed=12, **kw, cancel=cancel,
                            callback=lambda i, n, cancel=cancel: cancel.set() if i == 7 else None)]
        first, second = rt.run_batch(items)
        alone = rt("rain on a tin roof", seed=11, **kw).audios
        audio[label] = first.audios
        out[label] = {"second_cancelled": isinstance(second, RequestCancelled) and "step 8" in str(second),
                      "message": str(second), "rel_l2_first_vs_alone": rel_l2(first.audios, alone)}
    if {"queued", "host"} <= set(audio):
        out["rel_l2_queued_vs_host"] = rel_l2(audio["queued"], audio["host"])
    if {"queued", "stepwise"} <= set(audio):
        out["rel_l2_queued_vs_stepwise"] = rel_l2(audio["queued"], audio["stepwise"])
    return out


if __name__ == "__main__":
    main()
