"""The single export loop: pipeline → one ONNX file per component + tokenizers + manifest.json.

The folder is built under ``<out>.partial`` and renamed into place only when everything (manifest
last) is written, so an interrupted or failed export never leaves a folder that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

from tokenizers import Tokenizer

from .. import __version__
from ..runtime.artifacts import COMPONENTS as COMPONENT_NAMES
from ..runtime.artifacts import FORMAT_VERSION, MANIFEST, TOKENIZER_FILES
from ..runtime.errors import ExportError
from .components import (BY_NAME, FUSED_RECIPES, GPT2_GRAPHS, UNET_LAYOUTS, SampleShape, feature_extractor_config,
                         pipeline_constants, sample_inputs)
from .conv_bias import DISABLED_OPTIMIZERS
from .fold_shapes import fold_static_shapes
from .sources import Source, load_pipeline

log = logging.getLogger("audioldm2_trt.export")

OPSET = 17
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph itself
# An odd frame count makes the UNet trace its `upsample_size` path, so the graph accepts latent
# lengths that are not a multiple of its down-sampling factor (2.5 s → 63 frames, as diffusers allows).
EXPORT_SHAPE = SampleShape(batch=2, seq=7, frames=15)


def prepare_output(out: Path, overwrite: bool) -> Path:
    """Check that ``out`` can be written; return the staging folder next to it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {str(out)!r} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output folder {str(out)!r} is not empty; pass --overwrite to replace it")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create output folder {str(out)!r}: {err.strerror}") from err
    if not os.access(parent, os.W_OK):
        raise ExportError(f"output location {str(parent)!r} is not writable")
    staging = parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


PRECISIONS = ("fp32", "fp16")


def fused_components(precision: str, fuse: tuple[str, ...] | None) -> tuple[str, ...]:
    """The components to convert with their fused recipe: ``fuse`` as given, or by default every component
    with a fused recipe (``FUSED_RECIPES``) for fp16 and none for fp32."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if fuse is None:
        return tuple(FUSED_RECIPES) if precision == "fp16" else ()
    unknown = sorted(set(fuse) - set(FUSED_RECIPES))
    if unknown:
        raise ExportError(f"--fuse {','.join(unknown)}: fused recipes exist for {', '.join(FUSED_RECIPES)} only")
    if fuse and precision != "fp16":
        raise ExportError("--fuse applies to --precision fp16 (fusion happens before the fp16 conversion)")
    return tuple(fuse)


def export(source: Source, out: str | Path, overwrite: bool = False, pipe=None, precision: str = "fp32",
           fuse: tuple[str, ...] | None = None, gpt2_graph: str = "step", unet_layout: str = "nhwc") -> Path:
    """Export every component of ``source``'s pipeline (or of ``pipe``, already loaded from it) into ``out``.

    precision "fp16" exports fp32, then fuses and converts each component by its ``Fp16Recipe``; the
    components named by ``fused_components(precision, fuse)`` (fp16 default: every one in ``FUSED_RECIPES``) are
    converted with their fused recipe instead. ``fuse=()`` converts every component without fusion.
    ``gpt2_graph``: "step" or "unrolled" (``components.GPT2_GRAPHS``). ``unet_layout``: the fused UNet's convolutions,
    "nhwc" (the fastest) or "nchw" (its weights can then be packed by the runtime: ``components.UNET_FUSED_NCHW``).
    """
    fuse = fused_components(precision, fuse)
    if unet_layout not in UNET_LAYOUTS:
        raise ExportError(f"unet_layout {unet_layout!r} is not one of {', '.join(UNET_LAYOUTS)}")
    if unet_layout != "nhwc" and "unet" not in fuse:
        raise ExportError(f"unet_layout {unet_layout!r} applies to the fused UNet (--precision fp16 with the UNet fused); "
                          "the plain recipe has NCHW convolutions already")
    recipes = {**FUSED_RECIPES, "unet": UNET_LAYOUTS[unet_layout]}
    if gpt2_graph not in GPT2_GRAPHS:
        raise ExportError(f"gpt2_graph {gpt2_graph!r} is not one of {', '.join(GPT2_GRAPHS)}")
    out = Path(out)
    staging = prepare_output(out, overwrite)
    try:
        pipe = pipe if pipe is not None else load_pipeline(source)
        consts = pipeline_constants(pipe)
        entries = {}
        for name in COMPONENT_NAMES:
            t0 = time.perf_counter()
            entries[name] = export_component(pipe, consts, name, staging, precision,
                                             recipe=recipes[name] if name in fuse else None,
                                             spec=GPT2_GRAPHS[gpt2_graph] if name == "gpt2" else None)
            if name == "gpt2":
                entries[name]["graph"] = gpt2_graph
            log.info("exported %s in %.1f s", name, time.perf_counter() - t0)
        tokenizers = save_tokenizers(pipe, staging)
        manifest = build_manifest(pipe, source, consts, entries, tokenizers, precision)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def export_component(pipe, consts: dict, name: str, folder: Path, precision: str = "fp32", fold: bool = True,
                     recipe=None, spec=None) -> dict:
    """Export one component with the TorchScript exporter, fold its static shape arithmetic into constants
    (fold_shapes.py: what keeps ONNX Runtime from capturing CUDA graphs), then convert to fp16 if asked
    and its recipe allows. A recipe that hoists the text-only work (``Fp16Recipe.hoist_context``) also writes
    ``<name>_context.onnx``: the entry's "context" names it (with its hash and size)."""
    import onnx
    import torch

    spec = spec or BY_NAME[name]
    module = spec.build(pipe, consts).eval()
    if name == "unet":
        # ORT's attention fusion matches the classic processor, not SDPA (shared/reference/ort-cuda-facts.md).
        from diffusers.models.attention_processor import AttnProcessor

        module.unet.set_attn_processor(AttnProcessor())
    inputs = sample_inputs(spec, consts, EXPORT_SHAPE)
    scratch = folder / f".{name}.tmp"  # the exporter may scatter weights as files for > 2 GB models
    scratch.mkdir()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about shape-dependent Python branches; validation covers it
        torch.onnx.export(
            module, tuple(inputs.values()), str(scratch / "model.onnx"),
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
    path = folder / f"{name}.onnx"
    model = onnx.load(str(scratch / "model.onnx"))
    folded = fold_static_shapes(model) if fold else 0
    save_model(model, path)
    del model
    shutil.rmtree(scratch)
    fp16 = None
    recipe = recipe or spec.fp16
    if precision == "fp16" and not recipe.keep_fp32:
        from .optimize import to_fp16

        fp16 = {**to_fp16(path, recipe, save_model), "recipe": recipe.reason}
    context = fp16.pop("context", None) if fp16 else None
    if context is not None:
        context_file = folder / context["file"]
        context = {**context, "sha256": _sha256(context_file), "bytes": context_file.stat().st_size}
    external = f"{name}.onnx.data" if (folder / f"{name}.onnx.data").exists() else None
    return {
        "file": path.name,
        "external_data": external,
        "inputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims)} for t in spec.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims)} for t in spec.outputs],
        "dynamic_axes": {k: {str(i): d for i, d in v.items()} for k, v in spec.dynamic_axes().items()},
        "opset": OPSET,
        "precision": "fp16" if fp16 is not None else "fp32",
        "fp16": fp16,
        "folded_shape_values": folded,
        "sha256": _sha256(path, folder / external if external else None),
        "bytes": path.stat().st_size + ((folder / external).stat().st_size if external else 0),
        **({"context": context} if context is not None else {}),
        **({"length_multiple": recipe.length_multiple} if fp16 is not None and recipe.length_multiple != 1 else {}),
        **({"disabled_optimizers": list(DISABLED_OPTIMIZERS)} if fp16 is not None and fp16.get("conv_biases_as_add")
           else {}),
        **(module.manifest_extra() if hasattr(module, "manifest_extra") else {}),
    }


def save_model(model, path: Path) -> None:
    """Save an ONNX model; weights go to one ``<file>.data`` beside it when over the protobuf limit."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    weight_bytes = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def save_tokenizers(pipe, folder: Path) -> dict:
    """Write both tokenizers as ``tokenizers``-library JSON (what the torch-free runtime loads)."""
    entries = {}
    for which, tok in (("clap", pipe.tokenizer), ("t5", pipe.tokenizer_2)):
        backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
        if backend is None:
            raise ExportError(f"the {which} tokenizer ({type(tok).__name__}) has no fast (tokenizers) backend")
        path = folder / TOKENIZER_FILES[which]
        clean = Tokenizer.from_str(backend.to_str())
        clean.no_padding()  # transformers leaves the last call's padding/truncation on its backend
        clean.no_truncation()
        clean.save(str(path))
        entries[which] = {
            "file": path.name,
            "model_max_length": int(tok.model_max_length),
            "pad_token_id": int(tok.pad_token_id),
            "sha256": _sha256(path),
        }
    return entries


def build_manifest(pipe, source: Source, consts: dict, entries: dict, tokenizers: dict, precision: str) -> dict:
    import diffusers
    import onnx
    import torch
    import transformers

    return {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source.describe(),
        "precision": precision,
        "versions": {
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
        },
        "language_model_class": type(pipe.language_model).__name__,
        "constants": consts,
        "scheduler": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "feature_extractor": feature_extractor_config(pipe),
        "tokenizers": tokenizers,
        "components": entries,
        "content_hash": content_hash(entries, tokenizers),
    }


def content_hash(entries: dict, tokenizers: dict) -> str:
    """The manifest's content hash: every component's (and its context graph's) and tokenizer's sha256, in name
    order."""
    content = hashlib.sha256()
    for name in sorted(entries):
        content.update(entries[name]["sha256"].encode())
        if "context" in entries[name]:
            content.update(entries[name]["context"]["sha256"].encode())
    for which in sorted(tokenizers):
        content.update(tokenizers[which]["sha256"].encode())
    return content.hexdigest()


def _sha256(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            continue
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
