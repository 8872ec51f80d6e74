"""The shared arena's rules on the GPU, in one clean process: which sessions join it, that a session on it never
queues its runs, that runtimes sharing it give their audio alone when driven from two threads at once, and what a
runtime loaded after a capture gets.

    python scripts/shared_arena_check.py --artifacts /tmp/art-fp16 [--device cuda] [--request tiny|full] [--out DIR]

1. Four runtimes loaded before any request: two with the default (on CUDA the decode stage's sessions on the
   arena), one with every component on it (``shared_arena=True``) and one with none (``False``); their ``health()``:
   the components on the arena and whether the loops queue (every session on the arena: neither loop may).
2. Each one's audio for the request (one waveform, then two, ranked) against the one without the arena: rel-L2.
3. The default and the all-on-arena runtime driven from two threads at once, 4 requests each, one waveform and then
   two (the ranking's sessions): every result against that runtime's own run alone (their decode sessions take the
   arena's lock in turns). Then two default runtimes the same way: one's sessions on the arena then run while the
   other's off it do (the default and the all-on-arena pair never overlap so, as every run of the latter takes the
   lock). Run BD did the same with CLAP's text branch on the arena too: wrong audio (rel-L2 0.09-0.14).
4. After those captures: a runtime loaded with the default keeps arenas of its own (the arena takes no session
   after a capture), one loaded with ``shared_arena=True`` is refused, and so are ``queued_steps=True`` with the loop
   on the arena and CLAP's text branch with the decode stage's sessions (names outside ``SHARED_ARENA_CHECKED``).

Writes shared_arena_check.json. ``--request tiny`` is the short request of tests/test_gpu.py (the tiny export).
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from device_loop_check import rel_l2  # scripts/ is on the path of a script run from it

REQUESTS = {"full": None,  # benchmark.REQUEST
            "tiny": dict(prompt="a dog barking in the rain", negative_prompt="noise", num_inference_steps=6,
                         audio_length_in_s=2.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--request", choices=list(REQUESTS), default="full")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.errors import BackendError, InvalidRequestError

    if args.request == "full":
        from benchmark import REQUEST as request
    else:
        request = REQUESTS[args.request]
    from audioldm2_trt.runtime.backends.ort import SHARED_ARENA_DEFAULT

    # default_b: a second default runtime, so that one's decode stage (on the arena) runs while the other's UNet or
    # text stage (off it) runs — the overlap that the default+all pair never has (every run of 'all' takes the lock)
    options = {"default": None, "all": True, "none": False, "default_b": None}
    runtimes = {name: AudioLDM2Runtime.load(args.artifacts, device=args.device, shared_arena=option)
                for name, option in options.items()}  # all before the first request: the arena takes them all
    result = {"artifacts": args.artifacts, "device": args.device, "request": args.request, "health": {
        name: {k: rt.health()[k] for k in ("shared_arena", "queued_steps", "lm_queued")} for name, rt in runtimes.items()}}
    try:
        audio = {name: {"one": rt(**request, seed=0).audios,
                        "two": rt(**request, seed=1, num_waveforms_per_prompt=2).audios}
                 for name, rt in runtimes.items()}
        result["against_none"] = {name: {call: rel_l2(a, audio["none"][call]) for call, a in calls.items()}
                                  for name, calls in audio.items() if name != "none"}
        again = runtimes["none"](**request, seed=0).audios
        result["none_against_itself"] = rel_l2(again, audio["none"]["one"])

        # two runtimes whose decode sessions share the arena, from two threads at once
        result["two_threads"] = two_threads(runtimes, ("default", "all"), request)
        result["two_threads_two_waveforms"] = two_threads(runtimes, ("default", "all"), request, waveforms=2)
        result["two_default_runtimes"] = two_threads(runtimes, ("default", "default_b"), request)
        result["two_default_runtimes_two_waveforms"] = two_threads(runtimes, ("default", "default_b"), request,
                                                                   waveforms=2)

        # after the captures
        late = AudioLDM2Runtime.load(args.artifacts, device=args.device)
        try:
            result["late_default"] = {"shared_arena": late.health()["shared_arena"],
                                      "against_none": rel_l2(late(**request, seed=0).audios, audio["none"]["one"])}
        finally:
            late.close()
        refused, known = {}, set(runtimes["all"].health()["shared_arena"])  # every component of these artefacts
        # CLAP's text branch with the decode stage (run BD: wrong audio from two threads, packed or not) is refused
        for label, kwargs in (("late_all", {"shared_arena": True}),
                              ("queued_on_arena", {"shared_arena": True, "queued_steps": True}),
                              ("clap_text_on_arena", {"shared_arena": sorted((SHARED_ARENA_DEFAULT | {"clap_text"}) & known)})):
            try:
                AudioLDM2Runtime.load(args.artifacts, device=args.device, **kwargs).close()
                refused[label] = None
            except (BackendError, InvalidRequestError) as err:
                refused[label] = f"{type(err).__name__}: {err}"
        result["refused"] = refused
    finally:
        for rt in runtimes.values():
            rt.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shared_arena_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def two_threads(runtimes: dict, names: tuple, request: dict, waveforms: int = 1) -> dict:
    """The runtimes ``names`` driven from one thread each at once, 4 requests each: errors, and each runtime's worst
    rel-L2 against its own runs of the same requests alone."""
    seeds = (0, 2, 3, 5)
    call = lambda name, s: runtimes[name](**request, seed=s, num_waveforms_per_prompt=waveforms).audios  # noqa: E731
    alone = {name: {s: call(name, s) for s in seeds} for name in names}
    together, errors = {name: {} for name in names}, []

    def drive(name):
        try:
            for s in seeds:
                together[name][s] = call(name, s)
        except Exception as err:  # reported below
            errors.append(f"{name}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=drive, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"errors": errors, "worst_against_alone": {
        name: max(rel_l2(together[name][s], alone[name][s]) for s in together[name]) if together[name] else None
        for name in names}}


if __name__ == "__main__":
    main()
