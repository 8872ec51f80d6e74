"""Validation: every exported component run with ONNX Runtime against its PyTorch module.

Fresh random inputs at two shapes (batch 1 and 3, two sequence / latent lengths), float32,
relative L2 error per output. The PyTorch modules come from the same source the manifest names.
The UNet gets its T5 stream as the runtime feeds it: padded with zero states and mask 0 up to the
T5 bucket (``runtime.shapes.t5_bucket``), which is also what its attention kernels are chosen for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..runtime.artifacts import load_artifacts
from ..runtime.backends.base import Device
from ..runtime.backends.ort import OrtSessionFactory
from ..runtime.backends.ort_options import default_tf32
from ..runtime.denoising import ContextGraph
from ..runtime.errors import ExportError
from ..runtime.shapes import t5_bucket
from .components import SampleShape, sample_inputs, spec_of
from .sources import Source, load_pipeline

log = logging.getLogger("audioldm2_trt.export")

VALIDATION_SHAPES = (SampleShape(batch=1, seq=5, frames=16), SampleShape(batch=3, seq=12, frames=25))
FP32_TOLERANCE = 1e-4
# fp16 components: measured 1e-3 … 3e-3 on the full-size UNet, VAE and vocoder (ort-cuda-facts.md).
TOLERANCE = {"fp32": FP32_TOLERANCE, "fp16": 1e-2}


@dataclass(frozen=True)
class ComponentCheck:
    component: str
    shape: SampleShape
    output: str
    rel_l2: float
    max_abs: float
    precision: str = "fp32"
    bar: float | None = None  # overrides the precision's default tolerance

    @property
    def tolerance(self) -> float:
        return self.bar if self.bar is not None else TOLERANCE[self.precision]

    @property
    def passed(self) -> bool:
        return self.rel_l2 <= self.tolerance


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref|| / ||ref|| in float64 (0 when both are 0)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(a - ref) / denom) if denom > 0 else float(np.linalg.norm(a))


def source_of(manifest: dict) -> Source:
    src = manifest["source"]
    if src["kind"] == "random":
        return Source(random_config=src["config"], seed=src["seed"])
    return Source(model=src["model"])


def validate(folder, device: str = "cpu", shapes=VALIDATION_SHAPES, pipe=None,
             components=None) -> list[ComponentCheck]:
    """Compare every component of the artefact folder (or those named in ``components``) with PyTorch; returns one
    check per output."""
    import torch

    art = load_artifacts(folder)
    art.check_device(Device.parse(device).kind, hint="validate with --device cuda")
    unknown = sorted(set(components or ()) - set(art.manifest["components"]))
    if unknown:  # before the pipeline is loaded
        raise ExportError(f"components {unknown} are not in {folder} (it holds {', '.join(art.manifest['components'])})")
    pipe = pipe or load_pipeline(source_of(art.manifest))
    consts = art.constants
    # As the runtime runs them: fp16 artefacts' fp32 parts on TF32 (CUDA only), judged by the fp16 bar there.
    tf32 = default_tf32(art.precision) and Device.parse(device).kind == "cuda"
    factory = OrtSessionFactory.for_artifacts(art, device, tf32=tf32)
    checks = []
    for name, entry in art.manifest["components"].items():
        if components and name not in components:
            continue
        spec = spec_of(name, art.gpt2_graph)
        module = spec.build(pipe, consts).eval()
        session = _session(factory, art, name)
        for i, shape in enumerate(shapes):
            inputs = as_runtime_feeds(name, sample_inputs(spec, consts, shape, seed=100 + i),
                                      art.length_multiple(name))
            padded = {"unet": "encoder_hidden_states_1", "clap_text": "input_ids"}.get(name)  # as_runtime_feeds pads
            fed = SampleShape(shape.batch, inputs[padded].shape[1], shape.frames) if padded else shape  # as fed
            with torch.no_grad():
                ref = module(*inputs.values())
            ref = ref if isinstance(ref, tuple) else (ref,)
            got = session.run({k: v.numpy() for k, v in inputs.items()})
            for out_spec, r in zip(spec.outputs, ref):
                r = r.numpy()
                g = got[out_spec.name]
                if g.shape != r.shape:
                    raise AssertionError(f"{name}.{out_spec.name}: ONNX shape {g.shape} != torch {r.shape}")
                checks.append(ComponentCheck(name, fed, out_spec.name, rel_l2(g, r),
                                             float(np.max(np.abs(g.astype(np.float64) - r))), entry["precision"],
                                             bar=TOLERANCE["fp16"] if tf32 else None))
                log.info("%s %s %s rel-L2 %.2e", name, fed, out_spec.name, checks[-1].rel_l2)
    return checks


class _ThroughContext:
    """A component with a context graph (the fused UNet: export/hoist_context.py) run as one: the context graph on
    the conditioning, then the component's graph on its outputs, as the runtime runs them."""

    def __init__(self, session, context: ContextGraph):
        self.session, self.context = session, context

    def run(self, feeds: dict) -> dict:
        return self.session.run(self.context.host_feeds(feeds))


def _session(factory, art, name: str):
    session = factory.create(name, art.component_file(name))
    context = ContextGraph.of_component(factory, art, name)
    return session if context is None else _ThroughContext(session, context)


def as_runtime_feeds(component: str, inputs: dict, length_multiple: int = 1) -> dict:
    """The inputs as the runtime feeds this component: for the UNet, T5 states [B, S, D] and mask [B, S]
    padded with zeros to [B, t5_bucket(S), …] (``Conditioning.padded_t5``); for CLAP's text branch with a
    ``length_multiple`` (its manifest entry's), the tokens padded to a multiple of it with <pad> = 1 and mask 0, as
    ``tokenization.TextTokenizer`` pads them (the reference then sees the same padded rows). Other components
    unchanged.

    The runtime never gives the UNet another T5 length, and ONNX Runtime's memory-efficient attention (the
    UNet's masked T5 cross-attention under the default ``sdpa_kernel``) refuses unaligned ones (seen at 5 on
    the H100: "Attention::check_supported(p) was false")."""
    import torch

    if component == "clap_text" and length_multiple > 1:
        extra = -inputs["input_ids"].shape[1] % length_multiple
        return {"input_ids": torch.nn.functional.pad(inputs["input_ids"], (0, extra), value=1),
                "attention_mask": torch.nn.functional.pad(inputs["attention_mask"], (0, extra))}
    if component != "unet":
        return inputs
    states, mask = inputs["encoder_hidden_states_1"], inputs["encoder_attention_mask_1"]
    extra = t5_bucket(states.shape[1]) - states.shape[1]
    return {**inputs, "encoder_hidden_states_1": torch.nn.functional.pad(states, (0, 0, 0, extra)),
            "encoder_attention_mask_1": torch.nn.functional.pad(mask, (0, extra))}


# TensorRT engines against ONNX Runtime on the same ONNX files (CUDA provider, TF32 off in both).
TRT_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2}


def validate_trt(folder, device: str = "cuda") -> list[ComponentCheck]:
    """Every engine in ``folder/trt`` against ONNX Runtime at the engine profile's optimum and maximum
    latent length (batch 1 and 2). Tolerances: TRT_TOLERANCE per precision (relative L2)."""
    import json

    from ..runtime.backends.trt import load_engines
    from .trt_build import ENGINE_DIR, ENGINE_MANIFEST

    art = load_artifacts(folder)
    dev = Device.parse(device)
    if dev.kind != "cuda":
        raise ValueError(f"TensorRT validation runs on CUDA; got device {device!r}")
    entries = json.loads((art.folder / ENGINE_DIR / ENGINE_MANIFEST).read_text())["engines"]
    frames = entries["unet"]["profile"]["sample"]  # [min, opt, max] shapes of [B, C, F, M]
    shapes = (SampleShape(batch=1, seq=5, frames=frames[1][2]), SampleShape(batch=2, seq=12, frames=frames[2][2]))
    engines = load_engines(art.folder, dev, list(art.manifest["components"]))
    factory = OrtSessionFactory.for_artifacts(art, dev, cuda_graphs=False)
    checks = []
    for name in art.manifest["components"]:
        spec = spec_of(name, art.gpt2_graph)
        session = factory.create(name, art.component_file(name))
        for i, shape in enumerate(shapes):
            raw = sample_inputs(spec, art.constants, shape, seed=200 + i)
            feeds = {k: v.numpy() for k, v in as_runtime_feeds(name, raw, art.length_multiple(name)).items()}
            ref, got = session.run(feeds), engines[name].run(feeds)
            for out in spec.outputs:
                r, g = ref[out.name], got[out.name]
                checks.append(ComponentCheck(name, shape, out.name, rel_l2(g, r),
                                             float(np.max(np.abs(g.astype(np.float64) - r))), art.precision,
                                             TRT_TOLERANCE[art.precision]))
    return checks
