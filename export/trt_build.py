"""TensorRT engines from an artefact folder: optimisation profiles, engine keys, and the build itself.

    audioldm2-trt build DIR [--precision fp16] [--max-batch 4] [--lengths 5 10.24 20] [--workspace-gb 8]

Profiles come from the same buckets the ONNX Runtime backend uses: batch rows (CFG doubles the
UNet's), latent frames of the requested lengths, T5 lengths padded by ``t5_bucket``. Engines land in
``DIR/trt/`` with ``engines.json``, keyed on everything that makes an engine valid (ONNX hash,
precision, profiles, TensorRT and CUDA versions, GPU name and compute capability); a component whose
key is unchanged is not rebuilt. A timing cache is kept in ``DIR/trt/timing.cache``.

Precision: fp16 engines are built from **unfused fp16 artefacts** (``export --precision fp16 --fuse none``;
the default fp16 export's UNet, VAE decoder and text encoders hold ONNX Runtime contrib ops that TensorRT does not
parse, and the build refuses them) as *strongly typed* networks, so every tensor keeps the type the fp16 export gave
it: T5's fp32 part, the projection and (with ``--fuse none``) the VAE decoder stay fp32 (export/components.py says
why for each), the rest runs fp16. This keeps one source
of truth for precision instead of re-deciding it with TensorRT layer constraints. fp32 engines are
built from fp32 artefacts with no reduced-precision flag (TF32 disabled, as in the ORT backend).

Nothing in this module has been executed against TensorRT in this project (see README: TensorRT);
the profile and key logic is tested without it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..runtime.artifacts import components_of, gpt2_graph_of, load_artifacts
from ..runtime.errors import ArtifactError, BackendError
from ..runtime.shapes import audio_shape, lm_buffer, t5_bucket

ENGINE_DIR = "trt"
ENGINE_MANIFEST = "engines.json"
TIMING_CACHE = "timing.cache"
LM_EXTRA_TOKENS = 5  # projection: [sos, clap, eos] + [sos, t5…, eos] → t5_seq + 5 (tested on the export)
CFG_COMPONENTS = ("clap_text", "t5_encoder", "projection", "gpt2", "unet")  # see [negatives; positives] rows


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    max_batch: int = 4  # waveform rows per request batch (prompts × waveforms)
    lengths_s: tuple[float, ...] = (10.24,)  # the first is the profile's "opt"
    max_t5_tokens: int | None = None  # default: the tokenizer's model_max_length
    workspace_gb: float = 8.0


def dim_ranges(manifest: dict, opts: BuildOptions, component: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every dynamic dimension name for one component."""
    c = manifest["constants"]
    frames = [audio_shape(c, s).latent_frames for s in opts.lengths_s]
    samples = [audio_shape(c, s).samples for s in opts.lengths_s]
    t5_max = opts.max_t5_tokens or c["t5_model_max_length"]
    rows = 2 * opts.max_batch if component in CFG_COMPONENTS else opts.max_batch
    step_gpt2 = component == "gpt2" and gpt2_graph_of(manifest) == "step"
    t5 = (1, 16, t5_max)
    if component == "unet":  # the runtime pads T5 states to buckets before the UNet
        t5 = (t5_bucket(1), t5_bucket(16), t5_bucket(t5_max))
    f = (min(frames), frames[0], max(frames))
    return {
        "batch": (1, min(2, rows), rows),
        "clap_seq": (1, 16, c["clap_model_max_length"]),
        "t5_seq": t5,
        "lm_seq": tuple(v + LM_EXTRA_TOKENS for v in t5) if not step_gpt2 else  # the step graph's buffer widths
        tuple(lm_buffer(v + LM_EXTRA_TOKENS, c["max_new_tokens"], c["lm_max_positions"]) for v in t5),
        "frames": f,
        "mel_frames": tuple(v * c["vae_scale"] for v in f),
        "samples": (min(samples), samples[0], max(samples)),  # clap_features' input: the trimmed waveforms
    }


def profiles(manifest: dict, opts: BuildOptions) -> dict[str, dict[str, list[list[int]]]]:
    """component → input name → [min shape, opt shape, max shape], from the manifest's named dims."""
    out = {}
    for name in components_of(manifest):
        ranges = dim_ranges(manifest, opts, name)
        consts = manifest["constants"]
        shapes = {}
        for t in manifest["components"][name]["inputs"]:
            triple = [[], [], []]
            for d in t["dims"]:
                for i in range(3):
                    triple[i].append(ranges[d][i] if d in ranges else consts[d])
            shapes[t["name"]] = triple
        out[name] = shapes
    return out


def engine_key(onnx_sha256: str, precision: str, profile: dict, platform: dict) -> str:
    """Hash of everything an engine depends on; platform: tensorrt, cuda, gpu, compute_capability."""
    blob = json.dumps({"onnx": onnx_sha256, "precision": precision, "profile": profile, **platform}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_platform(entry: dict, platform: dict, folder) -> None:
    """An engine built elsewhere fails here, naming what differs and how to rebuild."""
    diffs = [f"{k} {entry.get(k)!r} (this machine: {platform[k]!r})"
             for k in ("tensorrt", "gpu", "compute_capability") if entry.get(k) != platform[k]]
    if diffs:
        raise ArtifactError(f"TensorRT engines in {folder} were built for {', '.join(diffs)}; rebuild with: "
                            f"audioldm2-trt build {folder} --precision {entry.get('precision', 'fp16')}")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ModuleNotFoundError as err:
        raise BackendError(
            "the TensorRT backend needs the tensorrt Python package (and a CUDA GPU): install NVIDIA's wheels, "
            "e.g. pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com, and cuda-python"
        ) from err
    return trt


def platform_info(device_index: int = 0) -> dict:
    """TensorRT / CUDA versions and the GPU, from tensorrt and cuda-python (no torch)."""
    trt = import_tensorrt()
    from cuda.bindings import runtime as cudart

    err, props = cudart.cudaGetDeviceProperties(device_index)
    if int(err) != 0:
        raise BackendError(f"cudaGetDeviceProperties({device_index}) failed: {err}")
    _, version = cudart.cudaRuntimeGetVersion()
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"tensorrt": trt.__version__, "cuda": version, "gpu": name.rstrip("\x00"),
            "compute_capability": f"{props.major}.{props.minor}"}


def build(folder, opts: BuildOptions = BuildOptions(), components=None, log=print) -> Path:
    """Build (or keep) one engine per component (default: each the folder holds) in ``folder/trt``; returns that
    folder."""
    art = load_artifacts(folder)
    components = art.components if components is None else components
    if art.precision != opts.precision:
        raise ArtifactError(f"{folder} holds {art.precision} artefacts; a {opts.precision} build needs "
                            f"`audioldm2-trt export ... --precision {opts.precision}` first")
    fused = {name: sorted((art.manifest["components"][name].get("fp16") or {}).get("fused") or {})
             for name in components}
    fused = {name: ops for name, ops in fused.items() if ops}
    if fused:  # ONNX Runtime contrib ops (MultiHeadAttention, GroupNorm, NhwcConv …) that TensorRT's parser lacks
        raise ArtifactError(f"{folder} holds ONNX Runtime-fused components ({fused}); TensorRT builds need "
                            "unfused fp16 artefacts: `audioldm2-trt export ... --precision fp16 --fuse none`")
    trt = import_tensorrt()
    platform = platform_info()
    out = Path(folder) / ENGINE_DIR
    out.mkdir(exist_ok=True)
    manifest_path = out / ENGINE_MANIFEST
    entries = json.loads(manifest_path.read_text())["engines"] if manifest_path.is_file() else {}
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = out / TIMING_CACHE
    all_profiles = profiles(art.manifest, opts)
    for name in components:
        entry = art.manifest["components"][name]
        key = engine_key(entry["sha256"], opts.precision, all_profiles[name], platform)
        engine_file = out / f"{name}.plan"
        if entries.get(name, {}).get("key") == key and engine_file.is_file():
            log(f"{name}: up to date, kept")
            continue
        t0 = time.perf_counter()
        log(f"{name}: building ({opts.precision}) …")
        plan = _build_one(trt, builder, logger, art.component_file(name), all_profiles[name], opts, cache_path)
        tmp = engine_file.with_suffix(".plan.partial")
        tmp.write_bytes(plan)
        tmp.replace(engine_file)
        entries[name] = {"key": key, "file": engine_file.name, "onnx_sha256": entry["sha256"],
                         "precision": opts.precision, "profile": all_profiles[name], **platform,
                         "build_s": round(time.perf_counter() - t0, 1)}
        manifest_path.write_text(json.dumps({"engines": entries}, indent=1))  # after each: resumable
        log(f"{name}: built in {time.perf_counter() - t0:.0f} s")
    return out


def _build_one(trt, builder, logger, onnx_path: Path, profile: dict, opts: BuildOptions, cache_path: Path) -> bytes:
    flags = 0
    if opts.precision == "fp16":  # types come from the fp16 ONNX graph (fp32 islands included)
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * 2**30))
    if opts.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    prof = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        prof.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"TensorRT failed to build {onnx_path.name} (see the log above)")
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)
