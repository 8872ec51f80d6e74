"""A copy of an fp16 artefact folder with its UNet (or VAE decoder) fused another way — for measurements without a full
re-export.

    python scripts/unet_variant.py --artifacts /tmp/art-fp16 [--source random:audioldm2] --variant nchw --out /tmp/art-nchw

The variant's component, from ``--artifacts``' source (the same random weights or checkpoint), is exported again with
a variant of its fused recipe into a new folder, whose other files are hard links to the base folder's, and whose
manifest is the base one with the new entry. With ``--source`` it starts while the base folder's export is still
running and waits for its manifest. Variants (H100 results in docs/benchmarks.md, run R):

- ``nchw``: ``UNET_FUSED_NCHW`` (what ``export --unet-layout nchw`` writes): no NhwcConv, so that the runtime can
  pack the UNet's weights;
- ``nchw_gn``: NhwcConv off and GroupNorm on NCHW as well — ONNX Runtime's CUDA GroupNorm refuses it ("only the
  channels_last layout is supported", run R); kept to show that.
- ``splitgelu``: ``UNET_FUSED`` with ``bias_split_gelu``: the GEGLU tails whose width ONNX Runtime's CUDA kernel
  takes (the 640-channel blocks' 5120) as one BiasSplitGelu node each (``export/bias_split_gelu.py``); measured
  against the default of the time in run AA; the default of runs AA–AC, the same recipe as ``nofold`` now.
- ``nofold``: ``UNET_FUSED`` without ``fold_biases`` (``export/fold_bias.py``), the default of runs AA–AC, before the
  biases moved into the SkipGroupNorm or bias after them; measured against the fold (the default since) in run AD.
- ``nopad``: ``UNET_FUSED`` without ``pad_geglu``: only the GEGLUs of the kernel's own width as BiasSplitGelu, the
  default of runs AD–AH; measured against the widened GEGLUs (the default since) in run AJ.
- ``nolnfold``: ``UNET_FUSED`` without ``fold_bias.py``'s third rewrite (each transformer's proj_in bias Add and
  LayerNorm as one SkipLayerNormalization), the default of runs AJ–AK; measured against it in run AL.
- ``nohoist``: ``UNET_FUSED`` without ``hoist_context`` (``export/hoist_context.py``): the text-only work (the
  cross-attention K/V projections, packed, and the T5 mask's bias) at every step, the default of runs AL–AM; measured
  against the context graph in run AN. The four variants above predate the context graph and are exported without it.
- ``vae_fold``: the VAE decoder with ``fold_biases`` (``VAE_FUSED`` does not fold): what run AD measured and turned
  down, its 100-prompt error worse than diffusers fp16's at the max.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

VARIANTS = ("nchw", "nchw_gn", "splitgelu", "nofold", "nopad", "nolnfold", "nohoist", "vae_fold")


def variant_component(variant: str) -> str:
    return "vae_decoder" if variant.startswith("vae_") else "unet"


def variant_recipe(variant: str):
    import dataclasses

    from audioldm2_trt.export.components import UNET_FUSED, UNET_FUSED_NCHW, VAE_FUSED

    if variant == "nchw":
        return UNET_FUSED_NCHW
    if variant == "vae_fold":  # run AD: folded, the VAE's 100-prompt max went over diffusers fp16's
        return dataclasses.replace(VAE_FUSED, fold_biases=("skip_group_norm", "linear_map"),
                                   reason=VAE_FUSED.reason + "; biases folded")
    if variant in ("splitgelu", "nofold"):  # the default of runs AA–AC: BiasSplitGelu, before fold_bias.py
        return dataclasses.replace(UNET_FUSED, fold_biases=(), pad_geglu=False, hoist_context=(),
                                   reason=UNET_FUSED.reason + " (biases not folded, GEGLUs not widened, no context)")
    if variant == "nopad":  # the default of runs AD–AH: only the GEGLUs of the kernel's own width fused
        return dataclasses.replace(UNET_FUSED, pad_geglu=False, fold_biases=("skip_group_norm", "linear_map"),
                                   hoist_context=(),
                                   reason=UNET_FUSED.reason + " (GEGLUs not widened, proj_in biases not folded, "
                                                              "no context)")
    if variant == "nolnfold":  # the default of runs AJ–AK: proj_in's bias Add and norm1 not one SkipLayerNormalization
        return dataclasses.replace(UNET_FUSED, fold_biases=("skip_group_norm", "linear_map"), hoist_context=(),
                                   reason=UNET_FUSED.reason + " (proj_in biases not folded, no context)")
    if variant == "nohoist":  # the default of runs AL–AM: the text-only work at every step
        return dataclasses.replace(UNET_FUSED, hoist_context=(), reason=UNET_FUSED.reason + " (no context graph)")
    return dataclasses.replace(UNET_FUSED_NCHW, fusion_options=UNET_FUSED_NCHW.fusion_options
                               + (("group_norm_channels_last", False),), reason="GroupNorm on NCHW (CUDA refuses it)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True, help="an fp16 artefact folder (its source is re-loaded)")
    ap.add_argument("--variant", nargs="+", choices=VARIANTS, default=["nchw"])
    ap.add_argument("--out", required=True, nargs="+", help="one folder per variant")
    ap.add_argument("--source", help="random:CONFIG or model:PATH — the base folder's source, to start before its "
                                     "export has finished (default: read from its manifest)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-s", type=float, default=1800, help="how long to wait for the base folder's manifest")
    args = ap.parse_args()
    if len(args.out) != len(args.variant):
        ap.error("--out needs one folder per --variant")

    from audioldm2_trt.export.components import pipeline_constants
    from audioldm2_trt.export.onnx_export import MANIFEST, content_hash, export_component
    from audioldm2_trt.export.sources import Source, load_pipeline
    from audioldm2_trt.export.validate import source_of

    base = Path(args.artifacts)
    t0 = time.perf_counter()
    if args.source:  # the base folder's export may still be running: its manifest appears when it has finished
        kind, _, rest = args.source.partition(":")
        source = Source(random_config=rest, seed=args.seed) if kind == "random" else Source(model=rest)
    else:
        source = source_of(json.loads((base / MANIFEST).read_text()))
    pipe = load_pipeline(source)
    consts = pipeline_constants(pipe)
    entries = {}
    for variant, out in zip(args.variant, args.out):
        out = Path(out)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        name = variant_component(variant)
        entries[variant] = export_component(pipe, consts, name, out, "fp16", recipe=variant_recipe(variant))
        entries[variant]["graph_variant"] = variant
        print(f"{variant}: {name} exported in {time.perf_counter() - t0:.0f} s; "
              f"fused {entries[variant]['fp16']['fused']}", flush=True)
    while not (base / MANIFEST).exists():
        if time.perf_counter() - t0 > args.wait_s:
            raise SystemExit(f"{base}: no manifest after {args.wait_s} s")
        time.sleep(5)
    manifest = json.loads((base / MANIFEST).read_text())
    if manifest["precision"] != "fp16" or source_of(manifest) != source:
        raise SystemExit(f"{base}: fp16 artefacts of {source} expected, got {manifest['precision']} of "
                         f"{manifest['source']}")
    for variant, out in zip(args.variant, args.out):
        out = Path(out)
        name = variant_component(variant)
        for f in base.iterdir():  # the variant's own files (its component's, and a context graph) are there already
            if f.is_file() and f.name not in (f"{name}.onnx", f"{name}.onnx.data", f"{name}_context.onnx", MANIFEST):
                os.link(f, out / f.name)
        manifest_out = {**manifest, "components": {**manifest["components"], name: entries[variant]}}
        manifest_out["content_hash"] = content_hash(manifest_out["components"], manifest_out["tokenizers"])
        (out / MANIFEST).write_text(json.dumps(manifest_out, indent=1))
        print(f"{variant}: {out} ready", flush=True)


if __name__ == "__main__":
    main()
