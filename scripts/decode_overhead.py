"""Where the decode stage's time goes besides its kernels: the VAE decoder's and the vocoder's runs as the pipeline
makes them, against their captured graphs replayed alone. A measurement script (docs/benchmarks.md), not a test.

    python scripts/decode_overhead.py --artifacts DIR [--device cuda] [--runs 30] --out DIR

On the H200 (run CR) a request's VAE run took 3.40 ms for 2.68 ms of kernels and the vocoder's 7.94 ms for about
7.0 (``loop_start_probe.py``, ``profile_kernels.py``). Whether binding the stage device to device (the loop's latents
into the VAE, its mel into the vocoder, one wait) can take that difference off depends on where it lies:

- ``run_ms``: ``OrtSession.run`` on the request's own feeds, as ``pipeline._decode`` calls it (the worker hand-off,
  the inputs' copy in, the replay waited for, the outputs' copy back);
- ``replay_ms``: the same shape key's graph replayed back to back on the session's worker (``_execute``, waited for;
  no copy either way) — the graph's time on the GPU with its gaps, ONNX Runtime's run call and the wait;
- ``copies_ms``: ``run_ms`` − ``replay_ms``, what the host adds per run around the replay.
With CUDA graphs, ``replay_ms`` minus the kernels' sum (``profile_kernels.py``) is the gaps inside the graph and
ONNX Runtime's per-run cost: what a device-to-device chain would keep. Writes decode_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PROMPT = "techno music with a strong upbeat tempo and high melodic riffs"
DECODE = ("vae_decoder", "vocoder")


def median_ms(values) -> float:
    return float(np.median(values) * 1e3)


def request_feeds(rt) -> dict:
    """The decode sessions' feeds of one request, recorded as the pipeline passes them."""
    feeds = {}
    originals = {name: rt._sessions[name].run for name in DECODE}

    def recorder(name):
        def run(f, _run=originals[name]):
            feeds[name] = {k: np.array(v, copy=True) for k, v in f.items()}
            return _run(f)
        return run

    for name in DECODE:
        rt._sessions[name].run = recorder(name)
    try:
        rt(PROMPT, negative_prompt="low quality", num_inference_steps=20, seed=0)
    finally:
        for name in DECODE:
            del rt._sessions[name].run  # the instance attribute: the class's method again
    return feeds


def durations(call, runs: int) -> list[float]:
    """Seconds each of ``runs`` calls of ``call()`` took, back to back."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def run_times(session, feeds: dict, runs: int) -> list[float]:
    return durations(lambda: session.run(feeds), runs)


def replay_times(session, runs: int) -> list[float]:
    """The most-run shape key's graph replayed back to back, each waited for, on the session's worker."""
    bound = max(session._bound.values(), key=lambda b: b.runs)
    with session.held():
        return session.call(lambda: durations(lambda: session._execute(bound), runs), what="replays alone")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from audioldm2_trt.runtime import AudioLDM2Runtime

    cpu = args.device == "cpu"  # (to check the script: every session bound, as on CUDA, without graphs)
    with AudioLDM2Runtime.load(args.artifacts, device=args.device, **({"device_loop": True} if cpu else {})) as rt:
        rt.warmup()
        feeds = request_feeds(rt)
        report = {"artifacts": args.artifacts, "device": args.device, "runs": args.runs, "components": {}}
        for _ in range(2):  # rounds: run and replay interleaved, the second round reported
            for name in DECODE:
                session = rt._sessions[name]
                run = run_times(session, feeds[name], args.runs)
                replay = replay_times(session, args.runs)
                report["components"][name] = {
                    "feeds": {k: [list(v.shape), str(v.dtype)] for k, v in feeds[name].items()},
                    "run_ms": median_ms(run), "replay_ms": median_ms(replay),
                    "copies_ms": median_ms(run) - median_ms(replay),
                    "cuda_graphs": session.cuda_graphs, "shared_arena": session.stats.shared_arena}
        report["health"] = rt.health()
    (out / "decode_overhead.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "health"}, indent=2))


if __name__ == "__main__":
    main()
