"""fp16 fidelity over 100 prompts: the runtime's fp16 artefacts and diffusers fp16 against diffusers fp32.

    python scripts/fidelity.py --fp16 /tmp/art-fp16 [--prompts 100] [--batch 10] [--out DIR]

Same weights (``--random-weights audioldm2``, the export's seed), same initial latents (numpy PCG64, one
seed per prompt), DPM-Solver++ 20 steps, CFG 3.5 with a negative prompt, 10.24 s. For every prompt the
waveform's mel spectrogram (STFT 1024 / hop 160, 64 Slaney mels up to 8 kHz, magnitude) is compared:
relative L2 = ‖mel(x) − mel(ref)‖ / ‖mel(ref)‖. Also counted: non-finite samples and silent outputs
(RMS < 1e-4). Writes fidelity.json and prints a summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np

SOUNDS = ["a dog barking", "rain on a tin roof", "a jazz piano solo", "a crowd cheering", "birds singing at dawn",
          "a car engine starting", "ocean waves crashing", "a violin playing a slow melody", "footsteps on gravel",
          "techno music with a strong upbeat tempo"]
PLACES = ["in a large hall", "far away", "close to the microphone", "with wind noise", "at night",
          "in a small room", "with people talking", "in the city", "underwater", "with heavy reverb"]
NEGATIVE = "low quality, noisy"
STEPS, GUIDANCE, SECONDS = 20, 3.5, 10.24


def prompts(n: int) -> list[str]:
    return [f"{s} {p}" for s in SOUNDS for p in PLACES][:n]


def mel(audio: np.ndarray, sr: int = 16000) -> np.ndarray:
    """[B, N] → magnitude mel [B, frames, 64]."""
    from audioldm2_trt.runtime.audio import mel_filter_bank

    n_fft, hop = 1024, 160
    window = np.hanning(n_fft + 1)[:-1]
    padded = np.pad(audio, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=1)[:, ::hop]
    spec = np.abs(np.fft.rfft(frames * window, axis=-1))
    return spec @ mel_filter_bank(n_fft // 2 + 1, 64, 0.0, 8000.0, sr, slaney=True)


def rel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, a.ndim))
    return np.sqrt(((a - b) ** 2).sum(axes)) / np.sqrt((b**2).sum(axes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp16", required=True, help="fp16 artefact folder (export --random-weights audioldm2 --precision fp16)")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--out", default=".")
    ap.add_argument("--without-graphs", default="", help="components to run without CUDA graphs (comma-separated)")
    ap.add_argument("--provider-options", type=json.loads, default=None, metavar="JSON",
                    help='per-component CUDA provider options for the runtime, e.g. \'{"unet": {"sdpa_kernel": 19}}\'')
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    import torch
    from diffusers import DPMSolverMultistepScheduler

    from audioldm2_trt.export.sources import Source, load_pipeline
    from audioldm2_trt.runtime import AudioLDM2Runtime

    from audioldm2_trt.runtime.artifacts import COMPONENTS

    skip = set(filter(None, args.without_graphs.split(",")))
    graphs = [c for c in COMPONENTS if c not in skip] if skip else "auto"
    rt = AudioLDM2Runtime.load(args.fp16, device="cuda", cuda_graphs=graphs, provider_options=args.provider_options)
    base = load_pipeline(Source(random_config="audioldm2"))
    base.scheduler = DPMSolverMultistepScheduler.from_config(base.scheduler.config)
    pipes = {"fp32": base.to("cuda", torch.float32), "fp16": copy.deepcopy(base).to("cuda", torch.float16)}
    c = rt.constants
    shape = (c["latent_channels"], rt.artifacts.constants["unet_sample_size"], c["latent_bins"])

    texts = prompts(args.prompts)
    outs = {"runtime_fp16": [], "diffusers_fp32": [], "diffusers_fp16": []}
    t0 = time.perf_counter()
    for start in range(0, len(texts), args.batch):
        chunk = texts[start:start + args.batch]
        latents = np.stack([np.random.default_rng(start + i).standard_normal(shape, dtype=np.float32)
                            for i in range(len(chunk))])
        outs["runtime_fp16"].append(rt(chunk, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                                       guidance_scale=GUIDANCE, audio_length_in_s=SECONDS, latents=latents).audios)
        for key, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            with torch.no_grad():
                audio = pipes[key](chunk, negative_prompt=[NEGATIVE] * len(chunk), num_inference_steps=STEPS,
                                   guidance_scale=GUIDANCE, audio_length_in_s=SECONDS, output_type="np",
                                   latents=torch.from_numpy(latents).to("cuda", dtype)).audios
            outs[f"diffusers_{key}"].append(np.asarray(audio, dtype=np.float32))
    audio = {k: np.concatenate(v) for k, v in outs.items()}
    ref = mel(audio["diffusers_fp32"].astype(np.float64))
    result = {"prompts": len(texts), "seconds": time.perf_counter() - t0,
              "settings": {"steps": STEPS, "guidance": GUIDANCE, "seconds": SECONDS, "negative": NEGATIVE,
                           "provider_options": args.provider_options}}
    for key in ("runtime_fp16", "diffusers_fp16"):
        err = rel_l2(mel(audio[key].astype(np.float64)), ref)
        rms = np.sqrt((audio[key].astype(np.float64) ** 2).mean(axis=1))
        result[key] = {"mel_rel_l2_median": float(np.median(err)), "mel_rel_l2_p95": float(np.percentile(err, 95)),
                       "mel_rel_l2_max": float(err.max()), "worst_prompt": texts[int(err.argmax())],
                       "non_finite_outputs": int((~np.isfinite(audio[key])).any(axis=1).sum()),
                       "silent_outputs": int((rms < 1e-4).sum()), "rms_min": float(rms.min()),
                       "per_prompt": err.tolist()}
    ref_rms = np.sqrt((audio["diffusers_fp32"].astype(np.float64) ** 2).mean(axis=1))
    result["diffusers_fp32"] = {"rms_min": float(ref_rms.min()), "silent_outputs": int((ref_rms < 1e-4).sum())}
    Path(args.out, "fidelity.json").write_text(json.dumps(result, indent=1))
    for key in ("runtime_fp16", "diffusers_fp16"):
        r = result[key]
        print(f"{key} vs diffusers fp32: mel rel-L2 median {r['mel_rel_l2_median']:.2e}, p95 {r['mel_rel_l2_p95']:.2e}, "
              f"max {r['mel_rel_l2_max']:.2e}; non-finite {r['non_finite_outputs']}, silent {r['silent_outputs']}")


if __name__ == "__main__":
    main()
