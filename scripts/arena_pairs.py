"""Which pairs of runtimes, driven from two threads at once, give wrong audio (a diagnosis of runs BF's failure):
two without the shared arena, two with the default's, and one default runtime from two threads.

    python scripts/arena_pairs.py --artifacts DIR [--request tiny|full] [--pairs none,default,single] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from shared_arena_check import REQUESTS, rel_l2, two_threads


def one_runtime_two_threads(rt, request: dict, waveforms: int = 1) -> dict:
    """One runtime, two threads each making 4 requests at once: worst rel-L2 against the same requests made alone."""
    seeds = {"a": (0, 2, 3, 5), "b": (7, 8, 9, 11)}
    alone = {s: rt(**request, seed=s, num_waveforms_per_prompt=waveforms).audios for ss in seeds.values() for s in ss}
    together, errors = {}, []

    def drive(ss):
        try:
            for s in ss:
                together[s] = rt(**request, seed=s, num_waveforms_per_prompt=waveforms).audios
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=drive, args=(ss,)) for ss in seeds.values()]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return {"errors": errors, "worst_against_alone": max(rel_l2(together[s], alone[s]) for s in together)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--request", choices=list(REQUESTS), default="full")
    ap.add_argument("--pairs", default="none,default,single")
    ap.add_argument("--waveforms", type=int, default=1)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from audioldm2_trt.runtime import AudioLDM2Runtime

    if args.request == "full":
        from benchmark import REQUEST as request
    else:
        request = REQUESTS[args.request]
    result = {}
    for pair in args.pairs.split(","):
        option = {"none": False, "default": None, "single": None, "nowb": None, "none_nowb": False}[pair]
        extra = {"weights_block": False} if pair.endswith("nowb") else {}
        if pair == "single":
            rt = AudioLDM2Runtime.load(args.artifacts, device="cuda", shared_arena=option)
            try:
                result[pair] = one_runtime_two_threads(rt, request, args.waveforms)
            finally:
                rt.close()
        else:
            runtimes = {n: AudioLDM2Runtime.load(args.artifacts, device="cuda", shared_arena=option, **extra)
                        for n in "ab"}
            try:
                result[pair] = two_threads(runtimes, ("a", "b"), request, args.waveforms)
            finally:
                for rt in runtimes.values():
                    rt.close()
        print(pair, json.dumps(result[pair]), flush=True)
        result[f"{pair}_{len(result)}"] = result.pop(pair)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "arena_pairs.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
