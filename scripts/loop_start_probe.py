"""Where a request's time goes between its stages: a timeline of the calls from the end of the text stage to the
waveform, on the runtime's default path (the denoising loop on the device, steps queued). A measurement script
(docs/benchmarks.md), not a test.

    python scripts/loop_start_probe.py --artifacts DIR [--device cuda] [--requests 10] --out DIR

``bench`` reports the loop's total and the median step; on the H200 the total is ~3.3 ms more than 20 median steps
(runs CG–CH). This patches the calls in between with a timestamp before and after each (same calls, same order, in
this process only) and reports, per call and occurrence, the median start and end in ms after the text stage's mark,
over ``--requests`` warm requests: the solver plan (made, or since ``schedulers.Plans`` looked up), the stepper's opening (the context graph's run, the UNet's
buffers, the solver's buffers and plan), each step's queueing and report (where steps are queued, a report waits for
its step's GPU work), the state's read back, the VAE decoder's and the vocoder's runs. Writes loop_start_probe.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PROMPT = "techno music with a strong upbeat tempo and high melodic riffs"


def _targets():
    """(owner, attribute, label) of every call timed."""
    from audioldm2_trt.runtime import conditioning, denoising, lm_loop, pipeline, schedulers
    from audioldm2_trt.runtime.backends import ort_session

    return [(lm_loop.LmLoop, "generate", "lm_loop.generate"),
            (getattr(conditioning, "Deferred", None), "__call__", "initial latents (Deferred)"),
            (pipeline, "_unet_conditioning", "unet_conditioning"),
            (ort_session.OrtSession, "start", "session.start"),
            (pipeline, "make_plan", "make_plan"),  # before ``schedulers.Plans``
            (getattr(schedulers, "Plans", None), "get", "plans.get"),
            (pipeline, "_read_back", "read_back"),
            (denoising.DeviceStepper, "open", "stepper.open"),
            (denoising.ContextGraph, "device_feeds", "context.device_feeds"),
            (ort_session.OrtSession, "key_buffers", "key_buffers"),
            (denoising.DeviceStepper, "_load", "stepper._load"),
            (denoising.SolverBuffers, "load_plan", "load_plan"),
            (denoising.DeviceStepper, "run", "stepper.run"),
            (denoising.DeviceStepper, "_queue_step", "queue_step"),
            (denoising.DeviceStepper, "_report", "report"),
            (denoising.DeviceStepper, "close", "stepper.close"),
            (ort_session.OrtSession, "run", "session.run")]


@contextmanager
def timed_calls(rows: list):
    """Each target call appends (label, session name or "", start, end) to ``rows``."""
    originals = []
    for owner, attr, label in _targets():
        if not hasattr(owner, attr):  # an older runtime (A/B runs of two versions): that call is not timed
            continue
        static = inspect.getattr_static(owner, attr)
        original = getattr(owner, attr)
        originals.append((owner, attr, static))

        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                name = getattr(args[0], "name", "") if args else ""
                rows.append((_label, name if isinstance(name, str) else "", start, time.perf_counter()))

        if isinstance(static, classmethod):  # called on the class: ``original`` is bound to it already
            setattr(owner, attr, staticmethod(timed))
        else:
            setattr(owner, attr, timed)
    try:
        yield
    finally:
        for owner, attr, static in originals:
            setattr(owner, attr, static)


def timeline(rows: list, marks: list) -> list[dict]:
    """One request's calls as (label, occurrence, start, end) in ms after its "text" mark; the marks too."""
    text = next(t for stage, t in marks if stage == "text")
    seen: dict = {}
    out = []
    for label, name, start, end in sorted(rows, key=lambda r: r[2]):
        key = f"{label}[{name}]" if name else label
        n = seen[key] = seen.get(key, -1) + 1
        out.append({"call": key, "n": n, "start_ms": (start - text) * 1e3, "end_ms": (end - text) * 1e3})
    unet_n = 0
    for stage, t in marks:
        if stage == "unet":
            out.append({"call": "mark unet", "n": unet_n, "start_ms": (t - text) * 1e3, "end_ms": (t - text) * 1e3})
            unet_n += 1
        elif stage != "text":
            out.append({"call": f"mark {stage}", "n": 0, "start_ms": (t - text) * 1e3, "end_ms": (t - text) * 1e3})
    return out


def medians(timelines: list[list[dict]]) -> list[dict]:
    """Per (call, occurrence) present in every request: median start and end, ordered by start."""
    keyed: dict = {}
    for tl in timelines:
        for row in tl:
            keyed.setdefault((row["call"], row["n"]), []).append((row["start_ms"], row["end_ms"]))
    out = []
    for (call, n), values in keyed.items():
        if len(values) != len(timelines):
            continue
        arr = np.array(values)
        out.append({"call": call, "n": n, "start_ms": float(np.median(arr[:, 0])),
                    "end_ms": float(np.median(arr[:, 1])), "duration_ms": float(np.median(arr[:, 1] - arr[:, 0]))})
    return sorted(out, key=lambda r: r["start_ms"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--out", default=".")
    ap.add_argument("--device-loop", action="store_true", help="the device loop on the CPU too (to check the script)")
    ap.add_argument("--latents-after-text", action="store_true",
                    help="GPT-2's passes given no host work to overlap, so the initial latents are drawn after the text "
                         "stage, as before run CO (A/B of encode_text's meanwhile)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime import pipeline

    if args.latents_after_text:
        from audioldm2_trt.runtime.lm_loop import LmLoop

        generate = LmLoop.generate
        LmLoop.generate = lambda self, x, mask, n, meanwhile=None: generate(self, x, mask, n)
    rt = AudioLDM2Runtime.load(args.artifacts, device=args.device, **({"device_loop": True} if args.device_loop else {}))
    rt.warmup()
    request = dict(negative_prompt="low quality, noisy", num_inference_steps=20, audio_length_in_s=10.24, seed=0)
    for _ in range(3):
        rt(PROMPT, **request)
    original_mark = pipeline._Clock.mark
    timelines, walls, stages = [], [], []
    for _ in range(args.requests):
        rows, marks = [], []

        def mark(self, stage, append=False, _marks=marks):
            _marks.append((stage, time.perf_counter()))
            return original_mark(self, stage, append)

        pipeline._Clock.mark = mark
        timings: dict = {}
        try:
            with timed_calls(rows):
                start = time.perf_counter()
                rt(PROMPT, **request, timings=timings)
                walls.append(time.perf_counter() - start)
        finally:
            pipeline._Clock.mark = original_mark
        timelines.append(timeline(rows, marks))
        stages.append(timings)
    table = medians(timelines)
    steps = [s for t in stages for s in t.get("unet", [])[1:]]
    report = {"artifacts": args.artifacts, "device": args.device, "requests": args.requests,
              "latents_after_text": args.latents_after_text,
              "request_ms": float(np.median(walls) * 1e3),
              "unet_marks_ms": {"first": float(np.median([t["unet"][0] for t in stages]) * 1e3),
                                "others": float(np.median(steps) * 1e3),
                                "last": float(np.median([t["unet"][-1] for t in stages]) * 1e3)},
              "timeline": table, "health": rt.health()}
    (out / "loop_start_probe.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"request {report['request_ms']:.2f} ms; unet marks: first {report['unet_marks_ms']['first']:.2f}, "
          f"others {report['unet_marks_ms']['others']:.2f}, last {report['unet_marks_ms']['last']:.2f} ms")
    for row in table:
        if row["call"] in ("queue_step", "report", "mark unet", "session.run[unet]") and 2 <= row["n"] <= 17:
            continue
        print(f"{row['start_ms']:9.3f} {row['end_ms']:9.3f} {row['duration_ms']:8.3f}  {row['call']} #{row['n']}")
    rt.close()


if __name__ == "__main__":
    main()
