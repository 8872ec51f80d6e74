"""The same request with the UNet's and VAE decoder's weights in the runtime's own block and without it, in one
process: the audio must match (the kernels read the same bytes from another address).

    python scripts/weights_block_check.py --artifacts /tmp/art-fp16 [--device cuda] [--out DIR]

Loads the runtime three times, one after another (block, no block, block again), runs the benchmark's request
(seed 0) and two waveforms of it (seed 1, where ranking applies) with each, and reports each variant's audio
against the first's as rel-L2 and the largest absolute difference; "block again" shows the run-to-run spread of
the same configuration. Writes weights_block_check.json.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmark import REQUEST
from device_loop_check import rel_l2
from result_json import write_result

VARIANTS = (("block", None), ("no_block", False), ("block_again", None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    from audioldm2_trt.runtime import AudioLDM2Runtime

    audio, blocks = {}, {}
    for name, option in VARIANTS:
        rt = AudioLDM2Runtime.load(args.artifacts, device=args.device, weights_block=option)
        try:
            blocks[name] = {n: c["weights_block"] for n, c in rt.health()["components"].items() if c["weights_block"]}
            audio[name] = {"one": rt(**REQUEST, seed=0).audios,
                           "two": rt(**REQUEST, seed=1, num_waveforms_per_prompt=2).audios}
        finally:
            rt.close()
    first = audio[VARIANTS[0][0]]
    result = {"artifacts": args.artifacts, "device": args.device, "weights_block_bytes": blocks, "against_block": {
        name: {call: {"rel_l2": rel_l2(a, first[call]),
                      "max_abs": float(np.abs(a - first[call]).max()), "identical": bool(np.array_equal(a, first[call]))}
               for call, a in calls.items()}
        for name, calls in audio.items() if name != VARIANTS[0][0]}}
    write_result(args.out, "weights_block_check.json", result)


if __name__ == "__main__":
    main()
