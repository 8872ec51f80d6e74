"""Runtimes driven from several threads at once on the GPU give the audio they give alone; the shared arena is
refused on CUDA for captured sessions outside the decode stage. One clean process:

    python scripts/shared_arena_check.py --artifacts /tmp/art-fp16 [--request tiny|full] [--out DIR]
        [--own-arenas | --decode-arena-uncaptured | --decode-arena [--waveforms N]] [--repeat N] [--python-buffers]

Why (docs/benchmarks.md, runs BF-BN): with the decode stage's captured sessions on ONNX Runtime's shared arena (the
default from run BA to run BF), two runtimes of one process driven from two threads gave the later-loaded one (both,
with two waveforms at full size) wrong audio — rel-L2 0.14-0.8 against their runs alone in most trials, tiny and
full-size exports — while with one arena per session (the default from then to run BN) every trial matched. The cause
was the runtime's bound buffers, which ONNX Runtime's Python allocator took from the arena (run BI); they are the
runtime's own there since (run BJ, tiny export: 11 of 11 right; runs BL-BO, full size, 15 processes: every waveform
right — where two came back in the other order, CLAP's scores of the pair lay 5e-6 to 3.3e-5 apart), and the decode
stage's captured sessions are on the arena by default again since run BN. Checked here:

1. ``two_runtimes_two_waveforms`` (the ranking's sessions too), then ``two_runtimes`` (one waveform): two runtimes
   from two threads, 4 requests each — each result against the same runtime's run of that request alone (rel-L2,
   worst of the 4), as ranked and with the waveforms matched to the run alone's (a ranking that changed order is not
   wrong audio: ``together_vs_alone``);
2. ``one_runtime``: one runtime from two threads, 4 requests each, the same way;
3. ``loaded_after_a_capture``: a second runtime loaded while ``one_runtime``'s, which has served, is still open,
   then the two from two threads;
4. ``refused``: ``shared_arena=True`` and one captured component's name outside the decode stage, refused on CUDA.

Each check's runtimes are loaded afresh, both before either serves (but 3's second), and the check's runtimes are
closed before the next check loads its own; ``on_arena`` records what each had on the shared arena (``health()``).
At the default (no switch) on CUDA every check's runtimes have the decode stage there — those of a check loaded after
the one before closed, whose captured graphs closed with it (``SharedArena.captured``) — but 3's second runtime:
loaded while a runtime with captured sessions on the arena is open, it keeps an arena per session (the default's
fallback). (Until run CD a runtime loaded after any capture in the process kept arenas of its own, so only the first
check's pair was on the arena.)
``--own-arenas``: 1-2 with one arena per session (``shared_arena=False``).
``--decode-arena-uncaptured``: 1-2 with the decode stage's sessions run without CUDA graphs and on the shared arena
(``shared_arena=DECODE_STAGE, cuda_graphs=captured_except(DECODE_STAGE)``).
``--decode-arena``: the decode stage's sessions captured on the arena, chosen explicitly (then a runtime loaded
after a capture is an error, not a fallback), only 1's two runtimes, once, with ``--waveforms`` (default 1) — run it
again for another trial.
``--python-buffers`` (diagnosis only): the runtime's bound buffers from ONNX Runtime's Python allocator, which takes
them from the shared arena once it is registered (run BI: ``ortvalue_allocator_probe.py``) — what runs BA-BI did;
by default, on a device whose arena is registered, they are the runtime's own (``backends/dlpack.py``).
``--repeat N``: each of 1-2 N times, in this process (its runtimes loaded afresh each time).
Writes shared_arena_check.json. ``--request tiny`` is the short request of tests/test_gpu.py (the tiny export).
"""

from __future__ import annotations

import argparse
import json
import threading

from audioldm2_trt.runtime.backends.ort import DECODE_STAGE as _DECODE_STAGE
from audioldm2_trt.runtime.pipeline import SESSION_NAMES
from device_loop_check import matched_order, rel_l2  # scripts/ is on the path of a script run from it
from result_json import write_result

REQUESTS = {"full": None,  # benchmark.REQUEST
            "tiny": dict(prompt="a dog barking in the rain", negative_prompt="noise", num_inference_steps=6,
                         audio_length_in_s=2.0)}
# the runtime's decode stage (on the arena by default on CUDA: backends.ort.SHARED_ARENA_DEFAULT), in pipeline order
# for the results (peak_memory.py's rows take it too)
DECODE_STAGE = tuple(n for n in SESSION_NAMES if n in _DECODE_STAGE)
SEEDS = ((0, 2, 3, 5), (7, 8, 9, 11))  # the two threads' requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--request", choices=list(REQUESTS), default="full")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--waveforms", type=int, default=1, help="with --decode-arena: waveforms per request")
    ap.add_argument("--own-arenas", action="store_true", help="one arena per session (shared_arena=False)")
    ap.add_argument("--decode-arena", action="store_true",
                    help="the decode stage's sessions captured on the shared arena, chosen explicitly: one trial")
    ap.add_argument("--decode-arena-uncaptured", action="store_true",
                    help="the decode stage's sessions uncaptured, on the shared arena")
    ap.add_argument("--python-buffers", action="store_true",
                    help="diagnosis only: the runtime's bound buffers from ONNX Runtime's Python allocator (the shared "
                         "arena once registered, as in runs BA-BI) instead of memory of its own")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.backends import shared_arena
    from audioldm2_trt.runtime.backends.base import Device
    from audioldm2_trt.runtime.errors import InvalidRequestError

    if args.request == "full":
        from benchmark import REQUEST as request
    else:
        request = REQUESTS[args.request]
    if args.own_arenas + args.decode_arena + args.decode_arena_uncaptured > 1:
        ap.error("choose one of --own-arenas, --decode-arena, --decode-arena-uncaptured")
    options = {"shared_arena": False} if args.own_arenas else {}
    if args.python_buffers:
        shared_arena.OWN_BUFFERS = False
    if args.decode_arena or args.decode_arena_uncaptured:
        from audioldm2_trt.runtime.pipeline import captured_except

        options["shared_arena"] = DECODE_STAGE  # (load leaves out a name with no session: the CPU's features)
        if not args.decode_arena:
            options["cuda_graphs"] = captured_except(DECODE_STAGE)
    load = lambda: AudioLDM2Runtime.load(args.artifacts, device=args.device, **options)  # noqa: E731
    chosen = options.get("shared_arena")
    result = {"artifacts": args.artifacts, "device": args.device, "request": args.request,
              "shared_arena": "default" if chosen is None else list(chosen or ()),
              "uncaptured": sorted(set(DECODE_STAGE) - set(options.get("cuda_graphs", DECODE_STAGE))), "runs": []}
    checks = ((f"two_runtimes_{args.waveforms}_waveforms", args.waveforms),) if args.decode_arena else (
        ("two_runtimes_two_waveforms", 2), ("two_runtimes", 1))
    on_arena = lambda runtimes: [rt.health()["shared_arena"] for rt in runtimes]  # noqa: E731
    for _ in range(1 if args.decode_arena else args.repeat):
        run = {}
        for label, waveforms in checks:
            runtimes = [load(), load()]  # both before any request
            try:
                run[label] = {**together_vs_alone(runtimes, request, waveforms), "on_arena": on_arena(runtimes)}
            finally:
                for rt in runtimes:
                    rt.close()
        if not args.decode_arena:
            rt = load()
            try:
                run["one_runtime"] = {**together_vs_alone([rt, rt], request, 1), "on_arena": on_arena([rt])}
                # a runtime loaded while this one, which has served, is open: at the default it keeps an arena per
                # session (its sessions may not join an arena with captured graphs); then the two at once
                later = load()
                try:
                    run["loaded_after_a_capture"] = {**together_vs_alone([rt, later], request, 1),
                                                     "on_arena": on_arena([rt, later])}
                finally:
                    later.close()
            finally:
                rt.close()
        print(json.dumps(run), flush=True)
        result["runs"].append(run)
    if not args.decode_arena:  # captured sessions outside the decode stage named for the arena: refused on CUDA
        refused = {}
        for label, choice in (("all", True), ("one_name", "t5_encoder")):
            try:
                AudioLDM2Runtime.load(args.artifacts, device=args.device, shared_arena=choice).close()
                refused[label] = None
            except InvalidRequestError as err:
                refused[label] = f"{type(err).__name__}: {err}"
        result["refused"] = refused
    # the runtime's bound buffers, as its sessions chose them: its own memory where the arena is registered on CUDA,
    # else ONNX Runtime's Python allocator ("python": from the arena once registered, as in runs BA-BI)
    own = shared_arena.OWN_BUFFERS and shared_arena.python_values_from_arena(Device.parse(args.device))
    result["buffers"] = "own" if own else "python"
    write_result(args.out, "shared_arena_check.json", result)


def together_vs_alone(runtimes: list, request: dict, waveforms: int) -> dict:
    """``runtimes[i]`` driven from thread i at once (the same runtime twice: one runtime from two threads), each
    thread making its 4 requests of ``SEEDS``, against the same runtime's run of the same request alone, made first
    in order (the first runtime's requests, then the second's). Per thread, the worst rel-L2 of:

    - ``worst_against_alone``: the waveforms as returned (ranked best first by CLAP when there are several);
    - ``worst_rows_matched``: each prompt's waveforms matched to the run alone's (the permutation closest in rel-L2),
      so a ranking that put the same waveforms in another order is told apart from wrong audio.

    ``order_differs`` lists each request whose ranking differs from its run alone, with both runs' CLAP scores of
    the same waveforms (row k: the run alone's k-th), so one can see whether the scores or only the order moved.
    With random weights CLAP's scores of two waveforms can lie closer than the fp16 UNet's spread moves them
    (docs/benchmarks.md, run BL): such a pair's order then changes between runs."""
    call = lambda i, s: runtimes[i](**request, seed=s, num_waveforms_per_prompt=waveforms)  # noqa: E731
    alone = [{s: call(i, s) for s in SEEDS[i]} for i in range(len(runtimes))]
    together, errors = [{} for _ in runtimes], []

    def drive(i):
        try:
            for s in SEEDS[i]:
                together[i][s] = call(i, s)
        except Exception as err:  # reported below
            errors.append(f"thread {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(runtimes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    as_ranked, matched, order_differs = [], [], []
    for i in range(len(runtimes)):
        ranked, rows = [], []
        for s, out in together[i].items():
            ref = alone[i][s]
            order = matched_order(out.audios, ref.audios, waveforms)
            ranked.append(rel_l2(out.audios, ref.audios))
            rows.append(rel_l2(out.audios[order], ref.audios))
            if order != list(range(len(order))):
                order_differs.append({"thread": i, "seed": s, "alone_scores": _floats(ref.scores),
                                      "together_scores": _floats(None if out.scores is None else out.scores[order])})
        as_ranked.append(max(ranked) if ranked else None)
        matched.append(max(rows) if rows else None)
    return {"errors": errors, "worst_against_alone": as_ranked, "worst_rows_matched": matched,
            "order_differs": order_differs}


def _floats(values) -> list[float] | None:
    return None if values is None else [float(v) for v in values]

if __name__ == "__main__":
    main()
