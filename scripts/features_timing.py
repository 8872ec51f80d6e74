"""Host cost of the ranking features on this machine's CPU: 16 kHz waveforms → 48 kHz → CLAP log-mel.

    python scripts/features_timing.py [--rows 4] [--seconds 10.24] [--repeat 7] [--artifacts DIR --device cuda]

Median milliseconds of the resampling, the log-mel features and ``clap_input_features`` (both, one thread per
row), and the CPU count — to tell compute from contention in the benchmark's batch-4 ranking stage. With
``--artifacts``: also ``clap_input_features`` through the artefacts' ``clap_features`` graph on ``--device`` (which
resamples, fits and computes the features with no host work), and how far its features are from the host's (dB).
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

    art = None
    if args.artifacts:
        from audioldm2_trt.runtime.artifacts import load_artifacts

        art = load_artifacts(args.artifacts)
    config = (art.manifest["feature_extractor"] if art is not None
              else json.loads((CONFIG_ROOT / "audioldm2" / "feature_extractor.json").read_text()))
    fe = ClapFeatures.from_config(config)
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
    if art is not None:
        from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

        graph = OrtSessionFactory.for_artifacts(art, args.device).create(
            "clap_features", art.component_file("clap_features"))
        on_graph = clap_input_features(audios, 16000, fe, graph)  # warm-up (and captures) before timing
        host = clap_input_features(audios, 16000, fe)
        loud = host > host.max(axis=(1, 2, 3), keepdims=True) - 70
        result.update({"device": args.device, "resampler": art.manifest["components"]["clap_features"].get("resampler"),
                       "clap_input_features_graph_ms": ms(lambda: clap_input_features(audios, 16000, fe, graph)),
                       "graph_vs_host_max_db_within_70db": float(np.abs(on_graph - host)[loud].max()),
                       "graph_vs_host_max_db": float(np.abs(on_graph - host).max())})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
