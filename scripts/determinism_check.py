"""Run-to-run determinism of one runtime on the GPU, per provider-option variant.

    python scripts/determinism_check.py --artifacts /tmp/art-fp16 [--out DIR]

For each variant: load, one warm call, then the worst relative L2 of 4 repeats against the first result (0.0 when
the same request on the same runtime gives bit-identical audio). Variants change one provider option of the UNet
and VAE decoder at a time, to find the kernel choice that makes the result vary from run to run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "default": {},
    "conv_exhaustive": {"unet": {"cudnn_conv_algo_search": "EXHAUSTIVE"},
                        "vae_decoder": {"cudnn_conv_algo_search": "EXHAUSTIVE"}},
    "sdpa_default": {"unet": {"sdpa_kernel": 0}},
    "conv_exhaustive_sdpa_default": {"unet": {"cudnn_conv_algo_search": "EXHAUSTIVE", "sdpa_kernel": 0},
                                     "vae_decoder": {"cudnn_conv_algo_search": "EXHAUSTIVE"}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=".")
    ap.add_argument("--deterministic-compute", action="store_true",
                    help="every session with ONNX Runtime's use_deterministic_compute on")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.deterministic_compute:
        import onnxruntime as ort

        class Deterministic(ort.SessionOptions):
            def __init__(self):
                super().__init__()
                self.use_deterministic_compute = True

        ort.SessionOptions = Deterministic
    from audioldm2_trt.runtime import AudioLDM2Runtime

    rows = []
    for name in filter(None, args.variants.split(",")):
        rt = AudioLDM2Runtime.load(args.artifacts, device="cuda", provider_options=VARIANTS[name] or None)
        call = lambda: rt("a dog barking in the rain", seed=1, num_inference_steps=5, audio_length_in_s=2.0).audios  # noqa: E731
        call()
        first = call()
        t0 = time.perf_counter()
        worst = max(float(np.linalg.norm(call() - first) / np.linalg.norm(first)) for _ in range(4))
        rows.append({"variant": name, "options": VARIANTS[name], "worst_repeat_rel_l2": worst,
                     "repeat_median_s": (time.perf_counter() - t0) / 4,
                     "deterministic_compute": args.deterministic_compute})
        print(rows[-1], flush=True)
        rt.close()
    rows.append({"per_session": per_session(args.artifacts)})
    print(rows[-1], flush=True)
    Path(args.out, "determinism.json").write_text(json.dumps(rows, indent=1))


def per_session(folder: str) -> dict:
    """Each session's last feeds of a real request (loop on the host) run 5 more times: the worst relative L2 and
    max |difference| of its outputs against the recorded ones; 0.0 for a deterministic session."""
    from audioldm2_trt.runtime import AudioLDM2Runtime

    rt = AudioLDM2Runtime.load(folder, device="cuda", device_loop=False)
    recorded = {}
    for name, session in rt._sessions.items():
        def record(feeds, _run=session.run, _name=name):
            out = _run(feeds)
            recorded[_name] = ({k: np.array(v) for k, v in feeds.items()}, {k: np.array(v) for k, v in out.items()})
            return out
        session.run = record
    for _ in range(2):
        rt("a dog barking in the rain", seed=1, num_inference_steps=5, audio_length_in_s=2.0, num_waveforms_per_prompt=2)
    result = {}
    for name, (feeds, outs) in recorded.items():
        worst, diff = 0.0, 0.0
        for _ in range(5):
            again = rt._sessions[name].run(feeds)
            for k, ref in outs.items():
                ref64, new64 = ref.astype(np.float64), np.asarray(again[k], np.float64)
                worst = max(worst, float(np.linalg.norm(new64 - ref64) / max(np.linalg.norm(ref64), 1e-30)))
                diff = max(diff, float(np.abs(new64 - ref64).max()))
        result[name] = {"worst_rel_l2": worst, "max_abs": diff}
    rt.close()
    return result


if __name__ == "__main__":
    main()
