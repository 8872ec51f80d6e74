"""Host cost of the ranking features on this machine's CPU: 16 kHz waveforms → 48 kHz → CLAP log-mel.

    python scripts/features_timing.py [--rows 4] [--seconds 10.24] [--repeat 7]

Median milliseconds of the resampling, the log-mel features and ``clap_input_features`` (both, one thread per
row), and the CPU count — to tell compute from contention in the benchmark's batch-4 ranking stage.
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
    print(json.dumps({"cpus": os.cpu_count(), "rows": args.rows,
                      "resample_serial_ms": ms(lambda: resample(audios, 16000, fe.sampling_rate)),
                      "log_mel_serial_ms": ms(lambda: fe(up)),
                      "clap_input_features_threaded_ms": ms(lambda: clap_input_features(audios, 16000, fe))}))


if __name__ == "__main__":
    main()
