"""How far CLAP's ranking scores of a two-waveform request move with the fp16 UNet's run-to-run spread, on the CPU,
from audio a GPU run saved. One process, no GPU:

    python scripts/clap_score_spread.py --audio docs/results/DIR/audio-runtime.npz [more .npz ...] \
        [--config audioldm2] [--prompt ...] [--out DIR]

Each ``.npz`` is one of peak_memory.py's audio files (``two``: float32 [2, samples] at the vocoder's 16 kHz, the two
waveforms of one request, ranked). The files hold the same request made by different runtime configurations, so
their rows differ only by the fp16 UNet's spread (rel-L2 ~2e-3, docs/benchmarks.md). Each file's rows are scored as
the runtime ranks them: resampled to CLAP's rate with soxr, the runtime's own features (``runtime/audio.py``, the
first 10 s), CLAP's audio and text branches — here in torch, float32, from the random full-size pipeline that
``--random-weights`` exports (export/sources.py, seed 0; whether this machine's transformers builds exactly the GPU
machine's weights is not checked: the spread, not the values, is what this measures). The question is whether
ranking differs between runs of one request: it does wherever the pair's score gap is smaller than that spread.
Writes clap_score_spread.json: per file, the two rows' scores and their gap, and the score spread across files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmark import PROMPT  # the benchmark's request, which peak_memory.py's audio files hold
from result_json import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--audio", nargs="+", required=True)
    ap.add_argument("--config", default="audioldm2")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    import torch

    from audioldm2_trt.export.sources import build_random_pipeline
    from audioldm2_trt.runtime.audio import ClapFeatures, resample

    pipe = build_random_pipeline(args.config, seed=0)
    features = ClapFeatures.from_config(pipe.feature_extractor.to_dict())
    clap = pipe.text_encoder.eval()
    with torch.no_grad():
        ids = pipe.tokenizer(args.prompt, padding=True, return_tensors="pt")
        text = _unit(clap.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask))
        scored = {}
        for path in args.audio:
            two = np.load(path)["two"]
            feats = features(resample(two, pipe.vocoder.config.sampling_rate, features.sampling_rate))
            audio = _unit(clap.get_audio_features(input_features=torch.from_numpy(feats)))
            scores = (audio @ text.T)[:, 0].numpy()
            scored[Path(path).name] = {"scores": [float(s) for s in scores], "gap": float(scores[0] - scores[1])}
            print(Path(path).name, scored[Path(path).name], flush=True)
    by_row = np.array([v["scores"] for v in scored.values()])  # [files, 2]
    write_result(args.out, "clap_score_spread.json", {
        "config": args.config, "prompt": args.prompt, "files": scored,
        "score_spread_across_files": [float(s) for s in by_row.max(0) - by_row.min(0)],
        "gap_signs": sorted({int(np.sign(v["gap"])) for v in scored.values()})})


def _unit(x):
    x = getattr(x, "pooler_output", x)  # transformers 5 returns an output object from get_*_features
    return x / x.norm(dim=-1, keepdim=True)


if __name__ == "__main__":
    main()
