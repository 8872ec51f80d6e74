"""Where the host time of a request goes between GPU work: the denoising loop's per-step calls and the text stage's
session runs, on CUDA; the runtime's default (steps queued one ahead on the loop's stream) against the loop as it
was before: each step waited for, and before that before runs AG and AH (``VARIANTS``). A measurement script
(docs/benchmarks.md), not a test.

    python scripts/step_overhead.py --artifacts DIR [--steps 20] [--rounds 5] [--variants default,...] --out DIR

Per variant (a runtime each, loaded in this one process; requests interleaved round by round):
- the request with a progress callback: its wall time, and each denoising step's as the pipeline sees it;
- inside each step (``DeviceStepper._queue_step`` and ``_report``, patched for this process only): queueing the step
  (the UNet's replay and the solver step's, each waited for where the steps are not queued ahead), and reporting it
  (waiting for it where they are, the row check's copy back, the pipeline's ``after_step``); and a step's start to
  the next one's;
- the UNet's captured graph replayed alone, back to back, through the loop's own binding;
- the text stage: each text session's ``run`` as the runtime calls it.
And the solver-step graph alone, uncaptured and captured, same inputs (outputs compared).
Host overheads barely depend on the model's size, so the tiny export shows them as well as the full one.
Writes step_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from audioldm2_trt.runtime.artifacts import COMPONENTS
from decode_overhead import median_ms, replay_times  # scripts/decode_overhead.py: a session's timings

PROMPT = "a dog barking in the rain"


@contextmanager
def timed_steps(timings: dict):
    """DeviceStepper's ``_queue_step`` and ``_report`` with a timestamp before and after each call (same calls, same
    order): ``timings["queue"]`` and ``timings["report"]`` get (step, start, end) rows."""
    from audioldm2_trt.runtime.denoising import DeviceStepper

    originals = {name: getattr(DeviceStepper, name) for name in ("_queue_step", "_report")}

    def queue_step(self, i, wait):
        s = time.perf_counter()
        out = originals["_queue_step"](self, i, wait)
        timings.setdefault("queue", []).append((i, s, time.perf_counter()))
        return out

    def report(self, queued, after_step):
        s = time.perf_counter()
        out = originals["_report"](self, queued, after_step)
        timings.setdefault("report", []).append((queued[0], s, time.perf_counter()))
        return out

    DeviceStepper._queue_step, DeviceStepper._report = queue_step, report
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(DeviceStepper, name, original)


def loop_parts(timings: dict) -> dict:
    """Medians of queueing a step and of reporting one (host time: where the steps are queued ahead, reporting
    includes the wait for the step's GPU work), and of a whole step: from one step's queueing to the next one's."""
    queue, report = np.array(timings["queue"]), np.array(timings["report"])
    out = {"queue": median_ms(queue[:, 2] - queue[:, 1]), "report": median_ms(report[:, 2] - report[:, 1])}
    follows = queue[1:, 0] == queue[:-1, 0] + 1  # consecutive steps of one loop
    out["step_total"] = median_ms((queue[1:, 1] - queue[:-1, 1])[follows])
    return out


def unet_replay_alone(rt, runs: int) -> float:
    """The UNet's captured graph of the request's shape key, replayed back to back through its own binding."""
    return median_ms(replay_times(rt._sessions["unet"], runs))


def solver_alone(rt, folder_graph: Path, device_index: int, runs: int) -> dict:
    """The solver-step graph over the UNet key's shapes: uncaptured (as the runtime runs it) and captured."""
    import onnxruntime as ort

    unet = rt._sessions["unet"]
    bound = max(unet._bound.values(), key=lambda b: b.runs)
    noise = bound.outputs["noise_pred"].numpy()
    rows = noise.shape[0] // 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, *noise.shape[1:]), dtype=np.float32)
    table = np.tile(np.array([0.9, 0.4, 0.5, 0.3, 0.1], np.float32), (1000, 1))
    inputs = {"noise_pred": rng.standard_normal(noise.shape, dtype=np.float32), "x": x,
              "prev_x0": np.zeros_like(x), "guidance": np.full((rows, 1, 1, 1), 3.5, np.float32),
              "step": np.array([3], np.int64), "coefficient_table": table,
              "timestep_table": np.arange(1001, dtype=np.int64)}
    result = {}
    outputs_by_mode = {}
    for mode in ("uncaptured", "captured"):
        options = {"device_id": device_index, "enable_cuda_graph": int(mode == "captured")}
        session = ort.InferenceSession(str(folder_graph), providers=[("CUDAExecutionProvider", options)])
        values = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", device_index) for k, v in inputs.items()}
        shapes = {"x_next": (x.shape, np.float32), "x0": (x.shape, np.float32),
                  "sample_next": (noise.shape, np.float32), "row_check": ((rows,), np.float32),
                  "step_next": ((1,), np.int64), "timestep_next": ((1,), np.int64)}
        outs = {name: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", device_index)
                for name, (shape, dtype) in shapes.items()}
        binding = session.io_binding()
        for k, v in values.items():
            binding.bind_ortvalue_input(k, v)
        for k, v in outs.items():
            binding.bind_ortvalue_output(k, v)
        ro = ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", "1" if mode == "captured" else "-1")
        times = []
        for n in range(runs + 3):
            s = time.perf_counter()
            session.run_with_iobinding(binding, ro)
            binding.synchronize_outputs()
            if n >= 3:
                times.append(time.perf_counter() - s)
        result[f"{mode}_ms"] = median_ms(times)
        outputs_by_mode[mode] = {k: v.numpy().copy() for k, v in outs.items()}
    captured, uncaptured = outputs_by_mode["captured"], outputs_by_mode["uncaptured"]
    result["max_abs_difference"] = max(float(np.max(np.abs(captured[k] - uncaptured[k]))) for k in captured)
    result["step_next"], result["timestep_next"] = int(captured["step_next"][0]), int(captured["timestep_next"][0])
    return result


def text_runs(rt, rounds: int) -> dict:
    """Each text session's ``run`` as the pipeline calls it (patched to record), over ``rounds`` requests."""
    records: dict[str, list] = {}
    originals = {}
    for name in ("clap_text", "t5_encoder", "projection", "gpt2"):
        session = rt._sessions[name]
        originals[name] = session.run

        def timed(feeds, _run=session.run, _name=name):
            s = time.perf_counter()
            out = _run(feeds)
            records.setdefault(_name, []).append(time.perf_counter() - s)
            return out

        session.run = timed
    try:
        for _ in range(rounds):
            rt(PROMPT, negative_prompt="low quality", num_inference_steps=2, seed=0)
    finally:
        for name, run in originals.items():
            rt._sessions[name].run = run
    return {name: {"runs_per_request": len(v) // rounds, "median_ms": median_ms(v),
                   "sum_per_request_ms": float(np.sum(v) * 1e3 / rounds)} for name, v in records.items()}


@contextmanager
def per_step_handoff():
    """The device loop handing each step to the UNet's worker thread on its own (as before run AH)."""
    from audioldm2_trt.runtime.denoising import DeviceStepper

    original = DeviceStepper._may_capture
    DeviceStepper._may_capture = lambda self: True
    try:
        yield
    finally:
        DeviceStepper._may_capture = original


# name → (load options, what the requests run under): the runtime's default (steps queued one ahead); each step
# waited for (before the queued steps); each step handed to the UNet's worker on its own too (before run AH); and that
# with the solver step uncaptured too (every component captured but it: before run AG)
VARIANTS = {"default": ({}, nullcontext), "step_by_step": ({"queued_steps": False}, nullcontext),
            "per_step_handoff": ({"queued_steps": False}, per_step_handoff),
            "solver_uncaptured": ({"cuda_graphs": list(COMPONENTS), "queued_steps": False}, per_step_handoff)}


def request_rounds(runtimes: dict, rounds: int, request: dict) -> dict:
    """Each runtime's request, rounds interleaved (A B C A B C …): wall per request and per step (progress callback)."""
    walls = {name: [] for name in runtimes}
    steps = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, rt in runtimes.items():
            marks = []
            with VARIANTS[name][1]():
                s = time.perf_counter()
                rt(PROMPT, callback=lambda i, n: marks.append(time.perf_counter()), **request)
                walls[name].append(time.perf_counter() - s)
            steps[name].extend(np.diff(marks))
    return {name: {"request_ms": median_ms(walls[name]), "request_ms_all": [round(w * 1e3, 2) for w in walls[name]],
                   "step_wall_ms": median_ms(steps[name])} for name in runtimes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N (cpu only to check the script: no graphs)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.pipeline import SOLVER_STEP_GRAPH

    runtimes = {}
    for name in args.variants.split(","):
        runtimes[name] = AudioLDM2Runtime.load(args.artifacts, device=args.device, device_loop=True,
                                               **VARIANTS[name][0])
        runtimes[name].warmup()
    request = dict(negative_prompt="low quality", num_inference_steps=args.steps, seed=0)
    report = {"artifacts": args.artifacts, "steps": args.steps, "rounds": args.rounds,
              "requests": request_rounds(runtimes, args.rounds, request), "variants": {}}
    for name, rt in runtimes.items():
        timings: dict = {}
        with timed_steps(timings), VARIANTS[name][1]():
            for _ in range(args.rounds):
                rt(PROMPT, **request)
        report["variants"][name] = {
            "loop_parts_ms": loop_parts(timings), "unet_replay_alone_ms": unet_replay_alone(rt, 50),
            "solver_graphs": rt._solver_step.stats.graphs, "text_runs": text_runs(rt, args.rounds),
            "health": rt.health()}
    if args.device.startswith("cuda"):
        rt = next(iter(runtimes.values()))
        report["solver_step_alone"] = solver_alone(rt, SOLVER_STEP_GRAPH, rt.device.index, 100)
    (out / "step_overhead.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({**report, "variants": {n: {k: v for k, v in r.items() if k != "health"}
                                             for n, r in report["variants"].items()}}, indent=2))


if __name__ == "__main__":
    main()
