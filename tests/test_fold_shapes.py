"""Folding shape arithmetic on static dimensions (export/fold_shapes.py): exact values on a hand-built graph,
and the exporter's real chains (the VAE's attention scale, GPT-2's 1/sqrt(head_dim)) gone with outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from audioldm2_trt.export.fold_shapes import fold_static_shapes, shape_values_into_data  # noqa: E402

from .conftest import needs_export  # noqa: E402


def _scale_graph():
    """y = x / sqrt(shape(x)[1]) * shape(x)[0]: the static axis 1 (8) folds, the dynamic batch axis does not."""
    h = onnx.helper
    nodes = [
        h.make_node("Shape", ["x"], ["s"]),
        h.make_node("Constant", [], ["i1"], value=h.make_tensor("i1", onnx.TensorProto.INT64, [], [1])),
        h.make_node("Constant", [], ["i0"], value=h.make_tensor("i0", onnx.TensorProto.INT64, [], [0])),
        h.make_node("Gather", ["s", "i1"], ["d"]),
        h.make_node("Cast", ["d"], ["df"], to=onnx.TensorProto.FLOAT),
        h.make_node("Sqrt", ["df"], ["r"]),
        h.make_node("Div", ["x", "r"], ["xs"]),
        h.make_node("Gather", ["s", "i0"], ["b"]),
        h.make_node("Cast", ["b"], ["bf"], to=onnx.TensorProto.FLOAT),
        h.make_node("Mul", ["xs", "bf"], ["y"]),
    ]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_static_axis_folds_and_dynamic_axis_stays():
    model = _scale_graph()
    assert len(shape_values_into_data(model)) == 2  # sqrt(8) and the batch size both reach float ops
    assert fold_static_shapes(model) >= 1
    onnx.checker.check_model(model)
    folded = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert np.isclose(folded["r"], np.sqrt(8.0))  # the static chain became the constant sqrt(8)
    assert [n.op_type for n in model.graph.node].count("Sqrt") == 0
    assert len(shape_values_into_data(model)) == 1  # the batch size is still computed at run time
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 8), dtype=np.float32)
        np.testing.assert_allclose(_run(model, {"x": x})[0], x / np.sqrt(8.0) * batch, rtol=1e-6)


@needs_export
@pytest.mark.parametrize("name", ["vae_decoder", "gpt2", "clap_audio"])
def test_exported_scale_chains_fold_without_changing_outputs(tiny_pipe, tmp_path, name):
    from audioldm2_trt.export.components import BY_NAME, pipeline_constants, sample_inputs
    from audioldm2_trt.export.onnx_export import export_component
    from audioldm2_trt.export.validate import VALIDATION_SHAPES

    consts = pipeline_constants(tiny_pipe)
    (tmp_path / "raw").mkdir()
    (tmp_path / "folded").mkdir()
    export_component(tiny_pipe, consts, name, tmp_path / "raw", fold=False)
    entry = export_component(tiny_pipe, consts, name, tmp_path / "folded")
    raw = onnx.load(str(tmp_path / "raw" / f"{name}.onnx"))
    folded = onnx.load(str(tmp_path / "folded" / f"{name}.onnx"))
    assert shape_values_into_data(raw), "the exporter's shape-derived scale is expected in the raw graph"
    assert shape_values_into_data(folded) == []
    assert entry["folded_shape_values"] > 0
    assert len(folded.graph.node) < len(raw.graph.node)
    for i, shape in enumerate(VALIDATION_SHAPES):  # two batch sizes and sequence lengths: dynamic axes stay dynamic
        feeds = {k: v.numpy() for k, v in sample_inputs(BY_NAME[name], consts, shape, seed=300 + i).items()}
        for a, b in zip(_run(raw, feeds), _run(folded, feeds)):
            assert a.shape == b.shape
            assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(a)


@needs_export
def test_every_exported_component_has_no_host_to_device_edge(tiny_artifacts):
    """The export as shipped: no shape arithmetic left that ONNX Runtime's CUDA provider would compute on the host
    and copy to the device (which refuses CUDA graph capture). On the H100 the raw export had such edges in
    clap_text and t5_encoder (padding-mask indices), gpt2 and vae_decoder (attention scales), clap_audio (its
    shifted windows' mask, 20 edges: the tiny CLAP audio has a shifted-window block for this)."""
    import json

    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    for name, entry in manifest["components"].items():
        model = onnx.load(str(tiny_artifacts / entry["file"]))
        assert shape_values_into_data(model) == [], name


@needs_export
def test_text_encoders_take_the_mask_without_index_arithmetic(tiny_pipe):
    """The 4-D padding mask built by the export wrapper gives transformers' own result, and the mask matters."""
    import torch

    from audioldm2_trt.export import wrappers

    ids = torch.randint(5, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        t5 = wrappers.T5Encoder(tiny_pipe.text_encoder_2)(ids, mask)
        t5_ref = tiny_pipe.text_encoder_2(input_ids=ids, attention_mask=mask)[0]
        t5_unmasked = wrappers.T5Encoder(tiny_pipe.text_encoder_2)(ids, torch.ones_like(mask))
        clap = wrappers.ClapText(tiny_pipe.text_encoder)(ids, mask)
        clap_ref = wrappers._pooled(tiny_pipe.text_encoder.get_text_features(input_ids=ids, attention_mask=mask))
    assert torch.allclose(t5, t5_ref, atol=1e-6) and torch.allclose(clap, clap_ref, atol=1e-6)
    assert (t5 - t5_unmasked)[1:].abs().max() > 1e-3
