"""A copy of an fp16 artefact folder with its UNet (or VAE decoder, GPT-2, T5, CLAP's text branch or vocoder) fused
another way — for measurements without a full re-export.

    python scripts/unet_variant.py --artifacts /tmp/art-fp16 [--source random:audioldm2] --variant nchw --out /tmp/art-nchw

The variant's component, from ``--artifacts``' source (the same random weights or checkpoint), is exported again with
a variant of its fused recipe into a new folder, whose other files are hard links to the base folder's, and whose
manifest is the base one with the new entry. With ``--source`` it starts while the base folder's export is still
running and waits for its manifest. The variants, what each is and which run measured it: ``VARIANTS`` below
(``--help`` lists them; H100 results in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Variant:
    """One variant: the component exported again, what it is (and which run measured it), and its recipe made from
    the export's fused recipes (``export/components.py``): ``recipe(components) -> Fp16Recipe``."""

    component: str
    about: str
    recipe: Callable


def _replace(base: str, reason: str, **changes):
    """A recipe: the fused recipe ``base`` of export/components.py with ``changes``, its reason extended."""
    return lambda c: dataclasses.replace(getattr(c, base), reason=getattr(c, base).reason + reason, **changes)


_FOLDS = ("skip_group_norm", "linear_map")  # fold_bias.py's first two rewrites, without the proj_in/LayerNorm one
# the default of runs AA-AC: the 640-channel GEGLUs as BiasSplitGelu, nothing after it
_BEFORE_FOLDS = _replace("UNET_FUSED", " (biases not folded, GEGLUs not widened, no context)", fold_biases=(),
                         pad_geglu=False, hoist_context=())

VARIANTS = {
    "nchw": Variant("unet", "UNET_FUSED_NCHW (what `export --unet-layout nchw` writes): no NhwcConv, so that the "
                    "runtime can pack the UNet's weights (run R)", lambda c: c.UNET_FUSED_NCHW),
    "nchw_gn": Variant("unet", "NhwcConv off and GroupNorm on NCHW as well: ONNX Runtime's CUDA GroupNorm refuses it "
                       "(\"only the channels_last layout is supported\", run R); kept to show that",
                       lambda c: dataclasses.replace(
                           c.UNET_FUSED_NCHW, reason="GroupNorm on NCHW (CUDA refuses it)",
                           fusion_options=c.UNET_FUSED_NCHW.fusion_options + (("group_norm_channels_last", False),))),
    "splitgelu": Variant("unet", "UNET_FUSED with only the GEGLUs of BiasSplitGelu's own width (the 640-channel "
                         "blocks') as BiasSplitGelu, no bias folds, no context graph: the default of runs AA-AC, "
                         "measured against the default before it in run AA (the same recipe as nofold)",
                         _BEFORE_FOLDS),
    "nofold": Variant("unet", "UNET_FUSED without fold_bias.py, the GEGLUs not widened, no context graph: the default "
                      "of runs AA-AC, measured against the fold in run AD",
                      _BEFORE_FOLDS),
    "nopad": Variant("unet", "UNET_FUSED without pad_geglu (only the GEGLUs of the kernel's own width fused), no "
                     "proj_in fold, no context graph: the default of runs AD-AH, measured against the widened GEGLUs "
                     "in run AJ",
                     _replace("UNET_FUSED", " (GEGLUs not widened, proj_in biases not folded, no context)",
                              pad_geglu=False, fold_biases=_FOLDS, hoist_context=())),
    "nolnfold": Variant("unet", "UNET_FUSED without fold_bias.py's third rewrite (each transformer's proj_in bias Add "
                        "and LayerNorm as one SkipLayerNormalization), no context graph: the default of runs AJ-AK, "
                        "measured against it in run AL",
                        _replace("UNET_FUSED", " (proj_in biases not folded, no context)", fold_biases=_FOLDS,
                                 hoist_context=())),
    "nohoist": Variant("unet", "UNET_FUSED without hoist_context.py: the text-only work (the cross-attention K/V "
                       "projections, packed, and the T5 mask's bias) at every step, the default of runs AL-AM, "
                       "measured against the context graph in run AN",
                       _replace("UNET_FUSED", " (no context graph)", hoist_context=())),
    "nomerge": Variant("unet", "UNET_FUSED without sibling_gemms.py (the 22 ResNets' time-embedding projections as 22 "
                       "GEMMs): the default of runs AN-CJ, measured against one GEMM per width in run CK",
                       _replace("UNET_FUSED", " (time-embedding projections not merged)", merge_sibling_gemms=False)),
    "gpt2_plain": Variant("gpt2", "GPT-2 converted without fusion (FP16_PLAIN): the default until GPT2_FUSED, measured "
                          "against it in run CF", lambda c: c.FP16_PLAIN),
    "t5_plain": Variant("t5_encoder", "T5 with its mixed-precision recipe and no fusion: the default until T5_FUSED, "
                        "measured against it in run CG", lambda c: c.BY_NAME["t5_encoder"].fp16),
    "clap_text_plain": Variant("clap_text", "CLAP's text branch converted without fusion (FP16_PLAIN): the default "
                               "until CLAP_TEXT_FUSED, measured against it in run CG", lambda c: c.FP16_PLAIN),
    "clap_noattention": Variant("clap_text", "CLAP_TEXT_FUSED: CLAP's text branch with its attention unfused (norms and "
                                "GELUs fused), the default of runs CG-CM, measured against CLAP_TEXT_ATTENTION in run CN",
                                lambda c: c.CLAP_TEXT_FUSED),
    "clap_nomea": Variant("clap_text", "CLAP_TEXT_ATTENTION: CLAP's text branch with its attention as "
                          "MultiHeadAttention, the q/k/v bias Adds before it and the tokens unpadded (the unfused "
                          "attention kernels run): the default of runs CN-CR, measured against CLAP_TEXT_MEA in runs "
                          "CQ-CR", lambda c: c.CLAP_TEXT_ATTENTION),
    "voc_cudnn_bias": Variant("vocoder", "the vocoder's mixed-precision recipe with each convolution's bias in the "
                              "convolution (cuDNN's bias op): the default until VOCODER_BIAS_ADD, measured against it "
                              "in runs CQ-CR", lambda c: c.BY_NAME["vocoder"].fp16),
    "vae_bias_add": Variant("vae_decoder", "VAE_FUSED with its convolution biases as Add nodes (conv_bias.py, NhwcConv "
                            "included): its 28 cuDNN bias ops (15.3 µs each, run CS's profile) as ONNX Runtime's Add; "
                            "scripts/conv_bias_probe.py on one H200 (run CT): the VAE's graph 2.78 → 2.57 ms, not yet "
                            "measured in the pipeline",
                            _replace("VAE_FUSED", "; convolution biases as Add nodes (ConvAddFusion off for the session)",
                                     conv_bias_as_add=True)),
    "unet_bias_add": Variant("unet", "UNET_FUSED with the convolution biases fold_bias.py leaves (14 NhwcConvs whose "
                             "output feeds no SkipGroupNorm: cuDNN's bias op, 4.4 µs each in run CO's profile) as Add "
                             "nodes; not measured",
                             _replace("UNET_FUSED", "; the convolution biases left as Add nodes (ConvAddFusion off)",
                                      conv_bias_as_add=True)),
    "vae_fold": Variant("vae_decoder", "the VAE decoder with fold_biases (VAE_FUSED does not fold): what run AD "
                        "measured and turned down, its 100-prompt error worse than diffusers fp16's at the max",
                        _replace("VAE_FUSED", "; biases folded", fold_biases=_FOLDS)),
}


def variant_component(variant: str) -> str:
    return VARIANTS[variant].component


def variant_recipe(variant: str):
    from audioldm2_trt.export import components

    return VARIANTS[variant].recipe(components)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="variants:\n" + "\n".join(f"  {name}: {v.component}, {v.about}"
                                                                  for name, v in VARIANTS.items()))
    ap.add_argument("--artifacts", required=True, help="an fp16 artefact folder (its source is re-loaded)")
    ap.add_argument("--variant", nargs="+", choices=list(VARIANTS), default=["nchw"])
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
        entry = entries[variant]
        if "graph" in manifest["components"][name]:  # GPT-2: which of its two graphs (the variant exports the same)
            entry = {**entry, "graph": manifest["components"][name]["graph"]}
        manifest_out = {**manifest, "components": {**manifest["components"], name: entry}}
        manifest_out["content_hash"] = content_hash(manifest_out["components"], manifest_out["tokenizers"])
        (out / MANIFEST).write_text(json.dumps(manifest_out, indent=1))
        print(f"{variant}: {out} ready", flush=True)


if __name__ == "__main__":
    main()
