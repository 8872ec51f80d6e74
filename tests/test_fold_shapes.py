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
@pytest.mark.parametrize("name", ["vae_decoder", "gpt2"])
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
