"""Which CUDA provider options and precisions make each heavy component fast: one session per variant,
timed alone (I/O bound on the device, CUDA graph replay unless the variant says otherwise).

    python scripts/ort_sweep.py --fp16 /tmp/art-fp16 [--fp32 /tmp/art-fp32] [--runs 30] [--out DIR]
    python scripts/ort_sweep.py --unet-recipes --fp32 /tmp/art-fp32 [--out DIR]

``--unet-recipes``: the fp32 UNet converted here with each fused recipe (UNET_RECIPES: attention unfused, the
previous default; attention fused with packed or separate Q/K/V, T5 mask as attention_bias), each timed at
batch 2 and compared with the fp32 UNet (TF32 off) on the same inputs: rel-L2 of the noise prediction, the
second row's T5 tokens half padding. Writes unet_recipes.json.

Components: the UNet at batch 2 (CFG), the VAE decoder and the vocoder at batch 1, 10.24 s. Model
variants: the fp16 artefacts as exported and, for the VAE decoder and vocoder, a plain fp16 conversion of
their fp32 file, made here with the export's own converter.
Option variants start from the runtime's common defaults (``cuda_provider_options``; with ``--runtime-defaults``
also each component's own, ``COMPONENT_PROVIDER_OPTIONS``, on the fp16 artefacts' files) and change one thing each.
Inputs are random with the shapes of a real request; every output is checked finite. Writes sweep.json
and prints ms per run (median) for each (component, model, options).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from audioldm2_trt.export.validate import rel_l2

from audioldm2_trt.runtime.backends.base import Device
from audioldm2_trt.runtime.artifacts import load_artifacts
from audioldm2_trt.runtime.backends.ort import OrtSessionFactory
from audioldm2_trt.runtime.backends.ort_options import COMPONENT_PROVIDER_OPTIONS, cuda_provider_options
from audioldm2_trt.runtime.denoising import ContextGraph

SECONDS = 10.24  # the benchmark's request length


def request_shapes(folder: str | Path) -> dict[str, dict[str, tuple]]:
    """``shapes_for`` an artefact folder's constants and a SECONDS-long request."""
    return shapes_for(json.loads((Path(folder) / "manifest.json").read_text())["constants"], SECONDS)


def shapes_for(c: dict, seconds: float) -> dict[str, dict[str, tuple]]:
    """Input shapes of a ``seconds``-long request for artefact constants ``c`` (the specs' named dims resolved from
    them), the UNet at batch 2 (prompt + negative, 16 T5 tokens). Full size, 10.24 s: sample (2, 8, 256, 16),
    GPT-2 states (2, 8, 768), T5 states (2, 16, 1024), VAE latents (1, 8, 256, 16), vocoder mel (1, 1, 1024, 64).
    benchmark.py's UNet-alone timing uses it too."""
    from audioldm2_trt.export.components import BY_NAME, SampleShape, input_shapes
    from audioldm2_trt.runtime.shapes import audio_shape

    frames = audio_shape(c, seconds).latent_frames
    return {name: input_shapes(BY_NAME[name], c, SampleShape(batch=batch, seq=16, frames=frames))
            for name, batch in (("unet", 2), ("vae_decoder", 1), ("vocoder", 1))}


OPTION_VARIANTS = {  # name → changes to the runtime's defaults (graph: capture a CUDA graph)
    "default": {},
    "tf32_off": {"use_tf32": 0},
    "tf32_on": {"use_tf32": 1},
    "no_pad_nc1d": {"cudnn_conv1d_pad_to_nc1d": 0},
    "heuristic": {"cudnn_conv_algo_search": "HEURISTIC"},
    # no algorithm search at all: cuDNN's implicit-precomputed-GEMM algorithm (a first run without the search)
    "default_search": {"cudnn_conv_algo_search": "DEFAULT"},
    "no_max_workspace": {"cudnn_conv_use_max_workspace": 0},
    "prefer_nhwc": {"prefer_nhwc": 1},
    "tunable_op": {"tunable_op_enable": 1, "tunable_op_tuning_enable": 1},
    "no_graph": {"graph": False},
    # attention kernels (the fused UNet's MultiHeadAttention; bit flags of ORT's sdpa_kernel option: 1 flash,
    # 2 cutlass memory-efficient, 8 cuDNN flash, 16 unfused; 0 = ORT's choice, cuDNN first for fp16 on Hopper)
    "sdpa_flash_efficient": {"sdpa_kernel": 1 | 2 | 16},
    "sdpa_efficient": {"sdpa_kernel": 2 | 16},
    "sdpa_cudnn": {"sdpa_kernel": 8 | 16},
    # each convolution's bias added by cuDNN's fused conv + bias engine instead of a separate cudnnAddTensor
    "fuse_conv_bias": {"fuse_conv_bias": 1},
}


def feeds_for(shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Random inputs of one component's ``shapes`` (request_shapes), a real timestep, the negative's T5 row half
    padding."""
    rng = np.random.default_rng(0)
    feeds = {}
    for name, shape in shapes.items():
        if name == "timestep":
            feeds[name] = np.array([500], dtype=np.int64)
        elif name.startswith("encoder_attention_mask"):
            mask = np.ones(shape, dtype=np.int64)
            mask[1, shape[1] // 2:] = 0  # the negative prompt's padding
            feeds[name] = mask
        else:
            feeds[name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def time_variant(path: Path, feeds: dict, changes: dict, runs: int, tf32_default: bool,
                 keep_output: list | None = None, base: dict | None = None) -> dict:
    """``base``: options over ``cuda_provider_options`` that every variant starts from (``--runtime-defaults``)."""
    changes = dict(changes)
    graph = changes.pop("graph", True)
    options = {**cuda_provider_options(Device.parse("cuda:0"), tf32_default), **(base or {}), **changes}
    if graph:
        options["enable_cuda_graph"] = 1
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", options)])
    create_s = time.perf_counter() - t0
    binding = session.io_binding()
    for k, v in feeds.items():
        binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
    for o in session.get_outputs():
        binding.bind_output(o.name, "cuda", 0)
    t0 = time.perf_counter()
    session.run_with_iobinding(binding)  # first run (cuDNN algorithm search; graph capture when on)
    first_s = time.perf_counter() - t0
    for _ in range(3):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        times.append(time.perf_counter() - t0)
    out = binding.copy_outputs_to_cpu()[0]
    if keep_output is not None:
        keep_output.append(out)
    result = {"ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "create_s": create_s,
              "first_s": first_s, "finite": bool(np.isfinite(out).all()), "out_rms": float(np.sqrt((out.astype(np.float64) ** 2).mean()))}
    del binding, session
    return result


def fp16_copy(src: Path, work: Path) -> Path:
    """A plain fp16 conversion of an fp32 artefact file (the export's own converter, no fusion)."""
    from audioldm2_trt.export.components import FP16_PLAIN
    from audioldm2_trt.export.onnx_export import save_model
    from audioldm2_trt.export.optimize import to_fp16

    dst = work / f"{src.stem}_fp16.onnx"
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    to_fp16(dst, FP16_PLAIN, save_model)
    return dst


def unet_recipes():
    """name → Fp16Recipe for the --unet-recipes comparison."""
    from dataclasses import replace

    from audioldm2_trt.export.components import UNET_FUSED, UNET_FUSED_NO_ATTENTION

    separate = replace(UNET_FUSED, fusion_options=UNET_FUSED.fusion_options + (("enable_packed_qkv", False),
                                                                              ("enable_packed_kv", False)))
    return {"attention_unfused": UNET_FUSED_NO_ATTENTION, "attention_packed": UNET_FUSED,
            "attention_separate_qkv": separate}


def _convert(job) -> str:
    src, dst, name = job
    from audioldm2_trt.export.onnx_export import save_model
    from audioldm2_trt.export.optimize import to_fp16

    shutil.copy(src, dst)
    t0 = time.perf_counter()
    summary = to_fp16(Path(dst), unet_recipes()[name], save_model)
    return json.dumps({"convert_s": time.perf_counter() - t0, **summary})


def unet_recipe_rows(args) -> None:
    """Convert the fp32 UNet with each recipe (in parallel processes), then time each against fp32."""
    from concurrent.futures import ProcessPoolExecutor

    src = model_path(Path(args.fp32), "unet")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = list(unet_recipes())
    jobs = [(str(src), str(work / f"unet_{n}.onnx"), n) for n in names]
    with ProcessPoolExecutor(len(jobs)) as pool:
        summaries = dict(zip(names, (json.loads(s) for s in pool.map(_convert, jobs))))
    shapes = request_shapes(args.fp32)["unet"]
    feeds = feeds_for(shapes)
    report = {"onnxruntime": ort.__version__, "shapes": shapes, "runtime_defaults": args.runtime_defaults,
              "results": []}
    reference: list = []
    row = {"recipe": "fp32_artefact_tf32_off", **time_variant(src, feeds, {"use_tf32": 0}, args.runs, True, reference)}
    record(report, row, Path(args.out, "unet_recipes.json"))
    for name in names:
        row = timed_row({"recipe": name, **summaries[name]}, work / f"unet_{name}.onnx", feeds, {}, args.runs, True,
                        reference)
        record(report, row, Path(args.out, "unet_recipes.json"))


def timed_row(row: dict, path: Path, feeds: dict, changes: dict, runs: int, tf32_default: bool,
              reference: list, base: dict | None = None) -> dict:
    """``row`` plus ``time_variant``'s figures and, given a reference output, the rel-L2 against it; a failure is
    recorded in the row (the sweep goes on)."""
    try:
        out: list = []
        row.update(time_variant(path, feeds, changes, runs, tf32_default, out, base))
        if reference:
            row["rel_l2_vs_fp32"] = rel_l2(out[0], reference[0])
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return row


def record(report: dict, row: dict, path: Path) -> None:
    """Append a row, print it, rewrite the report (partial results survive a stopped run)."""
    report["results"].append(row)
    print(json.dumps(row), flush=True)
    path.write_text(json.dumps(report, indent=1))


def through_context(folder: Path, name: str, feeds: dict) -> dict:
    """The feeds of ``name``'s graph in ``folder``: through its context graph where it has one (the fused UNet's,
    export/hoist_context.py: run once here, on the GPU, as the runtime's ``ContextGraph.host_feeds`` runs it), else
    ``feeds`` as they are."""
    art = load_artifacts(folder)
    if art.context(name) is None:
        return feeds
    # cuBLAS's workspace left as it is: the sweep's own sessions are measured with its default
    factory = OrtSessionFactory.for_artifacts(art, "cuda:0", cuda_graphs=False, cublas_workspace_kib=None)
    return ContextGraph.of_component(factory, art, name).host_feeds(feeds)


def model_path(folder: Path, name: str) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder / manifest["components"][name]["file"]


def fp32_source(args, name: str) -> Path:
    """The component's fp32 file: the fp16 artefacts' own where that export kept it fp32, else --fp32's."""
    entry = json.loads((Path(args.fp16) / "manifest.json").read_text())["components"][name]
    if entry.get("precision") == "fp32":
        return Path(args.fp16) / entry["file"]
    if not args.fp32:
        raise FileNotFoundError(f"{name} is fp16 in {args.fp16} and no --fp32 folder was given")
    return model_path(Path(args.fp32), name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp16")
    ap.add_argument("--unet-recipes", action="store_true")
    ap.add_argument("--fp32")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--components", default="unet,vae_decoder,vocoder")
    ap.add_argument("--variants", default=",".join(OPTION_VARIANTS))
    ap.add_argument("--runtime-defaults", action="store_true",
                    help="variants start from the runtime's per-component options for fp16 artefacts "
                         "(COMPONENT_PROVIDER_OPTIONS: the UNet's attention kernels and heuristic convolution search, "
                         "the vocoder's NHWC) on the fp16 artefacts' files, not from the common options alone")
    ap.add_argument("--work", default="/tmp/sweep")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.unet_recipes:
        if not args.fp32:
            ap.error("--unet-recipes needs --fp32 (the fp32 artefacts' UNet is converted with each recipe)")
        return unet_recipe_rows(args)
    if not args.fp16:
        ap.error("--fp16 is required")
    work = Path(args.work)
    shapes = request_shapes(args.fp16)
    report = {"onnxruntime": ort.__version__, "shapes": shapes, "runtime_defaults": args.runtime_defaults,
              "results": []}
    for name in args.components.split(","):
        reference: list = []  # the fp32 file's output, TF32 off, when there is one: every row's rel-L2 against it
        try:
            time_variant(fp32_source(args, name), feeds_for(shapes[name]), {"use_tf32": 0}, 3, True, reference)
        except FileNotFoundError:
            pass
        models = {"fp16_artefact": (model_path(Path(args.fp16), name), True)}
        # Also a plain fp16 conversion of the VAE decoder and vocoder, from the fp32 file (the fp16 artefact's own
        # where that export kept it fp32, as ``--fuse none`` does for the VAE; else --fp32's).
        if name != "unet":
            try:
                models["fp16_plain_here"] = (fp16_copy(fp32_source(args, name), work), True)
            except Exception as err:  # report, go on with the rest
                print(f"{name}: fp16 conversion failed: {err!r}", flush=True)
        for model, (path, tf32_default) in models.items():
            base = COMPONENT_PROVIDER_OPTIONS.get(name) if args.runtime_defaults and model == "fp16_artefact" else None
            feeds = feeds_for(shapes[name])
            if model == "fp16_artefact":
                feeds = through_context(Path(args.fp16), name, feeds)
            for variant in args.variants.split(","):
                row = timed_row({"component": name, "model": model, "variant": variant,
                                 **({"base_options": base} if base else {})}, path, feeds,
                                OPTION_VARIANTS[variant], args.runs, tf32_default, reference, base)
                record(report, row, Path(args.out, "sweep.json"))


if __name__ == "__main__":
    main()
