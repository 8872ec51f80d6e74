"""The vocoder session alone through the batch shapes of the failing tiny-export sequence (runs AS–AT,
docs/benchmarks.md): batch 1, then 4, then 2, then batch 1 again, each shape run enough times to be captured as a
CUDA graph, with the runtime's own session options, on each of ``--sessions`` vocoder sessions in turn; each
session's output for a shape compared with its first. A measurement
script (on CUDA it may end the process: CUDA error 715 poisons the context), not a test.

    python scripts/vocoder_shapes_check.py --artifacts DIR [--device cuda] [--order 1,4,2,1] [--runs 6]
        [--frames 200] [--sessions 3] [--variant default|no-graphs|heuristic|exhaustive] --out DIR

Variants, to tell where a failure comes from: ``default`` (the runtime's options), ``no-graphs`` (the vocoder
uncaptured), ``heuristic`` (cuDNN's heuristic algorithm choice instead of the exhaustive search), ``exhaustive``
(the exhaustive search, ONNX Runtime's default; since run AU fp32 artefacts' vocoder defaults to the heuristic one).
Writes vocoder_shapes_check.json (one row per shape visit, written after each, so a crash leaves the rows before it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VARIANTS = {"default": {}, "no-graphs": {"cuda_graphs": False},
            "heuristic": {"component_options": {"vocoder": {"cudnn_conv_algo_search": "HEURISTIC"}}},
            "exhaustive": {"component_options": {"vocoder": {"cudnn_conv_algo_search": "EXHAUSTIVE"}}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--order", default="1,4,2,1", help="batch sizes in the order they run")
    ap.add_argument("--runs", type=int, default=6, help="runs per visit (the runtime captures within 4)")
    ap.add_argument("--frames", type=int, default=200, help="mel frames (200: 2 s, as the failing sequence; 1024: 10.24 s)")
    ap.add_argument("--sessions", type=int, default=3,
                    help="vocoder sessions in the process, each through every visit in turn (the failing sequence had "
                         "three runtimes)")
    ap.add_argument("--variant", default="default", choices=sorted(VARIANTS))
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from audioldm2_trt.runtime.artifacts import load_artifacts
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    art = load_artifacts(args.artifacts)
    factory = OrtSessionFactory.for_artifacts(art, args.device, **VARIANTS[args.variant])
    path = art.session_files(["vocoder"])["vocoder"]
    vocoders = [factory.create("vocoder", path) for _ in range(args.sessions)]
    frames, bins = args.frames, art.manifest["constants"]["mel_bins"]
    rng = np.random.default_rng(0)
    mels = {b: (rng.standard_normal((b, 1, frames, bins)) * 0.5 - 4).astype(np.float32)
            for b in sorted({int(x) for x in args.order.split(",")})}
    first: dict = {}
    rows = []
    report = {"artifacts": args.artifacts, "device": args.device, "variant": args.variant, "order": args.order,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    for visit, batch in enumerate(int(x) for x in args.order.split(",")):
        for k, vocoder in enumerate(vocoders):
            diffs = []
            for _ in range(args.runs):
                wave = np.array(vocoder.run({"mel": mels[batch]})["waveform"], copy=True)
                first.setdefault((k, batch), wave)
                diffs.append(float(np.max(np.abs(wave - first[(k, batch)]))))
            rows.append({"visit": visit, "session": k, "batch": batch, "max_abs_diff_to_first": max(diffs),
                         "finite": bool(np.isfinite(wave).all()), "graphs": vocoder.stats.graphs})
            print(json.dumps(rows[-1]), flush=True)
            (out / "vocoder_shapes_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
