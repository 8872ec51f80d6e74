"""Sub-commands of the export stage: ``export`` and ``validate``."""

from __future__ import annotations

import argparse
import sys
import time

from ..runtime.errors import ExportError


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="export an AudioLDM 2 pipeline to an ONNX artefact folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id (needs network) or local diffusers AudioLDM2Pipeline folder")
    src.add_argument("--random-weights", metavar="NAME", help="random weights from a shipped config: tiny, audioldm2")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", required=True, help="artefact folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artefact folder")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                   help="fp16: fuse with ONNX Runtime's optimizer, then convert (per-component recipes)")
    p.add_argument("--fuse", default=None, metavar="NAMES",
                   help="with --precision fp16: comma-separated components (unet, vae_decoder, gpt2, t5_encoder, "
                        "clap_text, vocoder) to convert with ONNX Runtime's fusions (GroupNorm, NHWC conv, LayerNorm, "
                        "attention with the T5 mask kept; the UNet's GEGLU tails as BiasSplitGelu where it fits and, in "
                        "the nhwc layout, its biases folded into the node after them; the text encoders' norms and "
                        "GELUs, and GPT-2's and CLAP's attention; the vocoder's convolution biases as Adds), or 'none' "
                        "(needed for TensorRT builds); default for fp16: all six (unet and vae_decoder: 190 vs 339 ms "
                        "end to end on an H100; the text encoders: 145 vs 142 ms on an H200; same fidelity)")
    p.add_argument("--unet-layout", default="nhwc", choices=["nhwc", "nchw"],
                   help="with the fused UNet: nhwc (the fastest) or nchw, whose weights the runtime can place in one "
                        "allocation: ~100 MiB less GPU memory, 12 %% slower end to end on an H100")
    p.add_argument("--gpt2-graph", default="step", choices=["step", "unrolled"],
                   help="step: one GPT-2 pass the runtime runs 8 times (fast session creation, the GPU default); "
                        "unrolled: the 8 steps with a KV cache in one graph (less arithmetic: faster on the CPU)")
    p.add_argument("--validate", action="store_true", help="validate every component after exporting")
    p.set_defaults(run=run_export)

    v = sub.add_parser("validate", help="compare every exported component with PyTorch (ONNX Runtime)")
    v.add_argument("artifacts", help="artefact folder")
    v.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    v.add_argument("--components", default=None, metavar="NAMES",
                   help="comma-separated components to validate (default: all; backend ort)")
    v.add_argument("--backend", default="ort", choices=["ort", "trt"],
                   help="ort: ONNX Runtime vs PyTorch; trt: TensorRT engines vs ONNX Runtime (CUDA)")
    v.set_defaults(run=run_validate)

    b = sub.add_parser("build", help="build TensorRT engines from an artefact folder (needs tensorrt + a GPU)")
    b.add_argument("artifacts", help="artefact folder (fp16 artefacts for --precision fp16)")
    b.add_argument("--precision", default="fp16", choices=["fp16", "fp32"])
    b.add_argument("--max-batch", type=int, default=4, help="most waveform rows per request (CFG doubles the UNet's)")
    b.add_argument("--lengths", type=float, nargs="+", default=[10.24],
                   help="audio lengths in seconds the engines must cover; the first is the optimum")
    b.add_argument("--workspace-gb", type=float, default=8.0)
    b.set_defaults(run=run_build)


def run_export(args: argparse.Namespace) -> int:
    from .onnx_export import export
    from .sources import Source, random_config_names

    if args.random_weights and args.random_weights not in random_config_names():
        raise ExportError(f"unknown random-weights config {args.random_weights!r}; choose one of "
                          f"{', '.join(random_config_names())}")
    source = Source(model=args.model, random_config=args.random_weights, seed=args.seed)
    t0 = time.perf_counter()
    fuse = None if args.fuse is None else tuple(n.strip() for n in args.fuse.split(",") if n.strip() not in ("", "none"))
    out = export(source, args.out, overwrite=args.overwrite, precision=args.precision, fuse=fuse,
                 gpt2_graph=args.gpt2_graph, unet_layout=args.unet_layout)
    print(f"exported {source.describe()} to {out} in {time.perf_counter() - t0:.1f} s")
    device = "cuda" if args.precision == "fp16" else "cpu"
    return run_validate(argparse.Namespace(artifacts=out, device=device)) if args.validate else 0


def run_build(args: argparse.Namespace) -> int:
    from .trt_build import BuildOptions, build

    if args.max_batch < 1:
        raise ExportError(f"--max-batch must be ≥ 1, got {args.max_batch}")
    out = build(args.artifacts, BuildOptions(args.precision, args.max_batch, tuple(args.lengths),
                                             workspace_gb=args.workspace_gb))
    print(f"engines in {out}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from .validate import validate, validate_trt

    if getattr(args, "backend", "ort") == "trt":
        checks = validate_trt(args.artifacts, device=args.device)
    else:
        names = [n.strip() for n in args.components.split(",") if n.strip()] if getattr(args, "components", None) \
            else None
        checks = validate(args.artifacts, device=args.device, components=names)
    print(f"{'component':<12} {'batch':>5} {'seq':>4} {'frames':>6} {'output':<18} {'rel-L2':>9} {'max-abs':>9}")
    for c in checks:
        print(f"{c.component:<12} {c.shape.batch:>5} {c.shape.seq:>4} {c.shape.frames:>6} {c.output:<18} "
              f"{c.rel_l2:>9.2e} {c.max_abs:>9.2e} {c.precision} ≤ {c.tolerance:g} {'ok' if c.passed else 'FAIL'}")
    failed = [c for c in checks if not c.passed]
    if failed:
        print(f"{len(failed)} of {len(checks)} outputs exceed their precision's rel-L2 bar", file=sys.stderr)
        return 1
    print(f"all {len(checks)} outputs within their precision's rel-L2 bar")
    return 0
