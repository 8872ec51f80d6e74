"""fp16 artefacts: fusion keeps every graph input, Resize parameters stay fp32, converted graphs agree with fp32.

The fused UNet/VAE use CUDA-only contrib kernels, so here they are checked as graphs; the plainly
converted components (GPT-2, CLAP text, vocoder) also run on the CPU against their fp32 export.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from .conftest import needs_export

pytestmark = needs_export


def _fp16_copy(tiny_artifacts, tmp_path, name, fused=False):
    from audioldm2_trt.export.components import BY_NAME, FP16_PLAIN, UNET_FUSED, VAE_FUSED
    from audioldm2_trt.export.onnx_export import save_model
    from audioldm2_trt.export.optimize import to_fp16

    path = tmp_path / f"{name}.onnx"
    shutil.copy(tiny_artifacts / f"{name}.onnx", path)
    if fused:
        recipe = {"unet": UNET_FUSED, "vae_decoder": VAE_FUSED}[name]
    else:  # components kept fp32 by default (the vocoder) are still converted here, to test the converter
        recipe = BY_NAME[name].fp16 if not BY_NAME[name].fp16.keep_fp32 else FP16_PLAIN
    summary = to_fp16(path, recipe, save_model)
    return path, summary


def _elem_types(model):
    import onnx

    return {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type) for i in model.graph.input}


@pytest.mark.parametrize("name", ["unet", "vae_decoder"])
def test_fused_graph_keeps_inputs_and_resize_parameters(tiny_artifacts, tmp_path, name):
    import onnx

    fp32 = onnx.load(str(tiny_artifacts / f"{name}.onnx"))
    path, summary = _fp16_copy(tiny_artifacts, tmp_path, name, fused=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert _elem_types(model) == _elem_types(fp32)  # same names, float32/int64 at the boundary
    assert [o.name for o in model.graph.output] == [o.name for o in fp32.graph.output]
    assert summary["fused"].get("GroupNorm", 0) > 0 and summary["fused"].get("NhwcConv", 0) > 0
    assert "MultiHeadAttention" not in summary["fused"] and "Attention" not in summary["fused"]
    if name == "unet":  # the T5 mask still reaches the graph: it feeds at least one node
        assert any("encoder_attention_mask_1" in n.input for n in model.graph.node)
    init = {t.name: t.data_type for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Resize":
            for name_in in node.input[2:]:
                src = producers.get(name_in)
                if src is not None and src.op_type == "Constant":
                    assert src.attribute[0].t.data_type != onnx.TensorProto.FLOAT16, src.name
                if name_in in init:
                    assert init[name_in] != onnx.TensorProto.FLOAT16
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert weights, "no fp16 weights after conversion"


@pytest.mark.parametrize("name", ["gpt2", "clap_text", "vocoder", "unet"])
def test_converted_component_agrees_with_fp32(tiny_artifacts, tmp_path, name):
    from audioldm2_trt.export.components import BY_NAME, SampleShape, sample_inputs
    from audioldm2_trt.export.validate import TOLERANCE, rel_l2
    from audioldm2_trt.runtime.artifacts import load_artifacts
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    consts = load_artifacts(tiny_artifacts).constants
    path, _ = _fp16_copy(tiny_artifacts, tmp_path, name)
    factory = OrtSessionFactory("cpu")
    fp32 = factory.create(name, tiny_artifacts / f"{name}.onnx")
    fp16 = factory.create(name, path)
    feeds = {k: v.numpy() for k, v in sample_inputs(BY_NAME[name], consts, SampleShape(2, 9, 16), seed=4).items()}
    import onnx

    model = onnx.load(str(path))
    names = [n.name for n in model.graph.node]
    outputs = [o for n in model.graph.node for o in n.output]
    assert len(names) == len(set(names)) and len(outputs) == len(set(outputs))
    for out in fp32.output_names:
        a, b = fp16.run(feeds)[out], fp32.run(feeds)[out]
        assert a.dtype == np.float32
        assert rel_l2(a, b) <= TOLERANCE["fp16"], (out, rel_l2(a, b))
        assert rel_l2(a, b) > 0  # it really is a different (fp16) graph


def test_fp16_artefacts_refuse_the_cpu(tiny_artifacts, tmp_path):
    import json

    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.errors import ArtifactError

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    m = json.loads((art / "manifest.json").read_text())
    m["precision"] = "fp16"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="fp16 artefacts use CUDA-only fused kernels; load them with device='cuda'"):
        AudioLDM2Runtime.load(art, device="cpu")
