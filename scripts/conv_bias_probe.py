"""One component exported twice from the random full-size pipeline — its fused fp16 recipe as the default has it, and
with its convolution biases as Add nodes (``Fp16Recipe.conv_bias_as_add``, export/conv_bias.py) — each run on CUDA as
the runtime runs it (``OrtSessionFactory``: CUDA graphs, I/O binding; the variant with ConvAddFusion off as its
manifest entry would ask), timed and compared with the component in PyTorch fp32. A measurement script
(docs/benchmarks.md), not a test; a quick look before an A/B of the whole pipeline (``unet_variant.py``).

    python scripts/conv_bias_probe.py [--component vae_decoder] [--runs 50] --out DIR

Per recipe: the export's summary (the biases moved), ``run_ms`` (``OrtSession.run`` on one input, copies included)
and ``replay_ms`` (its captured graph replayed back to back, waited for, nothing copied), medians over ``--runs``,
two rounds interleaved (the second reported); and the output's rel-L2 against PyTorch fp32 on the same input.
Writes conv_bias_probe.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from decode_overhead import median_ms, replay_times, run_times  # scripts/decode_overhead.py: a session's timings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--component", default="vae_decoder", help="a component with a fused fp16 recipe")
    ap.add_argument("--config", default="audioldm2")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--frames", type=int, default=256, help="latent frames (256: 10.24 s)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from audioldm2_trt.export.components import BY_NAME, FUSED_RECIPES, SampleShape, pipeline_constants, sample_inputs
    from audioldm2_trt.export.onnx_export import export_component
    from audioldm2_trt.export.sources import build_random_pipeline
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    name = args.component
    pipe = build_random_pipeline(args.config)
    consts = pipeline_constants(pipe)
    spec = BY_NAME[name]
    shape = SampleShape(batch=1, seq=16, frames=args.frames)  # a 10.24 s request: 256 latent frames
    feeds = {k: v.numpy() for k, v in sample_inputs(spec, consts, shape).items()}
    with torch.no_grad():
        reference = spec.build(pipe, consts).eval()(*[torch.from_numpy(v) for v in feeds.values()])
    reference = (reference[0] if isinstance(reference, (tuple, list)) else reference).numpy()
    default = FUSED_RECIPES[name]
    recipes = {"default": default,
               "bias_add": dataclasses.replace(default, conv_bias_as_add=True,
                                               reason=default.reason + "; convolution biases as Add nodes")}
    report = {"component": name, "config": args.config, "runs": args.runs,
              "feeds": {k: [list(v.shape), str(v.dtype)] for k, v in feeds.items()}, "recipes": {}}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, recipe in recipes.items():
            folder = Path(tmp) / label
            folder.mkdir()
            entry = export_component(pipe, consts, name, folder, "fp16", recipe=recipe)
            factory = OrtSessionFactory(args.device, bind=True,  # (CUDA binds anyway; the CPU to check the script)
                                        disabled_optimizers={name: entry.get("disabled_optimizers", [])})
            sessions[label] = factory.create(name, folder / entry["file"])
            got = sessions[label].run(feeds)[spec.outputs[0].name].astype(np.float64)
            report["recipes"][label] = {
                "fp16": entry.get("fp16"), "disabled_optimizers": entry.get("disabled_optimizers", []),
                "rel_l2_vs_torch_fp32": float(np.linalg.norm(got - reference) / np.linalg.norm(reference)),
                "finite": bool(np.isfinite(got).all())}
        for _ in range(2):  # rounds, interleaved; the second reported
            for label, session in sessions.items():
                report["recipes"][label].update(run_ms=median_ms(run_times(session, feeds, args.runs)),
                                                replay_ms=median_ms(replay_times(session, args.runs)),
                                                cuda_graphs=session.cuda_graphs)
        for session in sessions.values():
            session.close()
    (out / "conv_bias_probe.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
