"""The ranking's choice among several waveforms against diffusers' CLAP in fp32, on the same waveforms.

    python scripts/ranking_check.py --artifacts /tmp/art-fp16 [--device cuda] [--prompts 20] [--waveforms 4] [--out DIR]

For each prompt the runtime generates ``--waveforms`` waveforms (10.24 s, DPM-Solver++ 20, CFG 3.5) and returns them
ranked, with its scores (cosine similarity: CLAP's audio branch as exported, fp16 in fp16 artefacts, on the features
graph's resampling and log-mel). The reference scores the same waveforms as diffusers' ``score_waveforms`` does —
soxr HQ resampling to 48 kHz, transformers' ``ClapFeatureExtractor``, ``ClapModel(...).logits_per_text`` — in fp32
torch (TF32 off) on ``--device``, with the weights the artefacts were exported from (their manifest's source). One
deliberate difference: rows longer than CLAP's 10 s are cut to their first 10 s on both sides (transformers picks a
random offset, which the runtime does not; diffusers' own choice is therefore random per call).

Reported: per prompt both score vectors, whether the reference orders the runtime's ranked waveforms the same way
(all places, and first place), the largest score difference and the reference's gap between its first two.
Writes ranking-check.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fidelity import GUIDANCE, NEGATIVE, SECONDS, STEPS, prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--waveforms", type=int, default=4)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()

    import torch

    from audioldm2_trt.export.sources import load_pipeline
    from audioldm2_trt.export.validate import source_of
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.audio import resample

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rt = AudioLDM2Runtime.load(args.artifacts, device=args.device)
    pipe = load_pipeline(source_of(rt.artifacts.manifest))
    clap, fe, tokenizer = pipe.text_encoder.to(args.device), pipe.feature_extractor, pipe.tokenizer
    scale = float(clap.logit_scale_t.detach().exp())
    rows = []
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts(args.prompts)):
        out = rt(prompt, negative_prompt=NEGATIVE, num_waveforms_per_prompt=args.waveforms, audio_length_in_s=SECONDS,
                 num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=i)
        at_clap_rate = resample(out.audios, out.sample_rate, fe.sampling_rate)[:, : fe.nb_max_samples]
        features = fe(list(at_clap_rate), sampling_rate=fe.sampling_rate, return_tensors="pt").input_features
        text = tokenizer([prompt], padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = clap(input_ids=text.input_ids.to(args.device), attention_mask=text.attention_mask.to(args.device),
                          input_features=features.to(args.device)).logits_per_text[0]
        reference = logits.double().cpu().numpy() / scale
        order = np.argsort(-reference, kind="stable")  # the runtime returned its best first: agreement is 0, 1, 2 …
        top2 = np.sort(reference)[::-1][:2]
        rows.append({"prompt": prompt, "seed": i, "runtime_scores": [float(s) for s in out.scores],
                     "reference_scores": [float(s) for s in reference], "reference_order": order.tolist(),
                     "same_order": bool((order == np.arange(len(order))).all()), "same_first": bool(order[0] == 0),
                     "max_score_diff": float(np.abs(np.asarray(out.scores, np.float64) - reference).max()),
                     "reference_gap_first_two": float(top2[0] - top2[1])})
        print(f"{i:3d} same order {rows[-1]['same_order']!s:5} first {rows[-1]['same_first']!s:5} "
              f"max score diff {rows[-1]['max_score_diff']:.2e} gap {rows[-1]['reference_gap_first_two']:.2e}",
              flush=True)
    summary = {"prompts": len(rows), "waveforms": args.waveforms, "device": args.device,
               "same_order": sum(r["same_order"] for r in rows), "same_first": sum(r["same_first"] for r in rows),
               "max_score_diff": max(r["max_score_diff"] for r in rows),
               "median_score_diff": float(np.median([r["max_score_diff"] for r in rows])),
               "min_reference_gap_first_two": min(r["reference_gap_first_two"] for r in rows),
               "precision": rt.artifacts.precision, "ranking_features": rt.health()["ranking_features"],
               "resampler": rt.artifacts.manifest["components"]["clap_features"].get("resampler"),
               "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ranking-check.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
