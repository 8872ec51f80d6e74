"""Host cost of the ranking features on this machine's CPU: 16 kHz waveforms → 48 kHz → CLAP log-mel.

    python scripts/features_timing.py [--rows 4] [--seconds 10.24] [--repeat 7] [--artifacts DIR --device cuda]

Median milliseconds of the resampling, the log-mel features and ``clap_input_features`` (both, one thread per
row), and the CPU count — to tell compute from contention in the benchmark's batch-4 ranking stage. With
``--artifacts``: also the host part the features graph leaves (resample + fit + pad), the artefacts'
``clap_features`` session alone on ``--device``, and ``clap_input_features`` through it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.24)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--artifacts", help="an artefact folder with clap_features (its graph is timed too)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from audioldm2_trt.export.sources import CONFIG_ROOT
    from audioldm2_trt.runtime.audio import ClapFeatures, resample
    from audioldm2_trt.runtime.ranking import clap_input_features

    fe = ClapFeatures.from_config(json.loads((CONFIG_ROOT / "audioldm2" / "feature_extractor.json").read_text()))
    audios = (0.2 * np.random.default_rng(0).standard_normal((args.rows, int(args.seconds * 16000)))).astype(np.float32)

    def ms(fn):
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return round(statistics.median(times), 2)

    up = resample(audios, 16000, fe.sampling_rate)
    result = {"cpus": os.cpu_count(), "rows": args.rows,
              "resample_serial_ms": ms(lambda: resample(audios, 16000, fe.sampling_rate)),
              "log_mel_serial_ms": ms(lambda: fe(up)),
              "clap_input_features_threaded_ms": ms(lambda: clap_input_features(audios, 16000, fe))}
    if args.artifacts:
        from audioldm2_trt.runtime.artifacts import load_artifacts
        from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

        art = load_artifacts(args.artifacts)
        if "clap_features" not in art.components:
            raise SystemExit(f"{args.artifacts} has no clap_features graph (exported before it existed); "
                             "export again to time it")
        graph = OrtSessionFactory.for_artifacts(art, args.device).create(
            "clap_features", art.component_file("clap_features"))
        padded = fe.prepare(up)
        graph.run({"waveform": padded})
        result.update({"device": args.device, "prepare_serial_ms": ms(lambda: fe.prepare(up)),
                       "graph_alone_ms": ms(lambda: graph.run({"waveform": padded})),
                       "clap_input_features_graph_ms": ms(lambda: clap_input_features(audios, 16000, fe, graph))})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
