"""export/sibling_gemms.py: Gemm nodes that read one input, merged into one Gemm and a Split, give the same outputs.

Checked on ONNX Runtime's CPU provider: on small graphs (eligible and ineligible GEMMs side by side) and on the tiny
UNet as exported (its ResNets' time-embedding projections, with their biases) and as fused (after fold_bias.py took
their biases). The fused fp16 UNet as a whole is validated against PyTorch on the GPU (``tests/test_gpu.py``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from audioldm2_trt.export.sibling_gemms import merge_sibling_gemms  # noqa: E402

M, K = 3, 5


def _run(model, feeds: dict) -> dict:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _siblings_model():
    """x → three Gemms of width 4 (transB, no bias), one of width 2, two of width 3 (weight [K, N], bias), one with
    alpha 2 and one reading another input (neither eligible); the weight of one width-3 Gemm is also read by a MatMul
    elsewhere."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [init("wa", 4, K), init("wb", 4, K), init("wc", 4, K), init("wn", 2, K), init("wd", K, 3), init("bd", 3),
             init("we", K, 3), init("be", 3), init("wf", 4, K), init("wg", 4, K)]
    nodes = [
        helper.make_node("Gemm", ["x", "wa"], ["a"], name="a", transB=1),
        helper.make_node("Gemm", ["x", "wb"], ["b"], name="b", transB=1),
        helper.make_node("Relu", ["x"], ["rx"], name="relu"),
        helper.make_node("Gemm", ["x", "wn"], ["n"], name="n", transB=1),
        helper.make_node("Gemm", ["x", "wc"], ["c"], name="c", transB=1),
        helper.make_node("Gemm", ["x", "wd", "bd"], ["d"], name="d"),
        helper.make_node("Gemm", ["x", "we", "be"], ["e"], name="e"),
        helper.make_node("Gemm", ["x", "wf"], ["f"], name="f", transB=1, alpha=2.0),
        helper.make_node("Gemm", ["rx", "wg"], ["g"], name="g", transB=1),
        helper.make_node("MatMul", ["rx", "wd"], ["h"], name="reads_wd"),
        helper.make_node("Add", ["a", "f"], ["af"], name="reads_a"),
    ]
    outputs = {"a": 4, "b": 4, "c": 4, "n": 2, "d": 3, "e": 3, "f": 4, "g": 4, "h": 3, "af": 4}
    graph = helper.make_graph(nodes, "siblings", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [M, n]) for o, n in outputs.items()],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_siblings_of_one_width_become_one_gemm_and_give_the_same_outputs():
    model = _siblings_model()
    feeds = {"x": np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)}
    reference = _run(model, feeds)
    merged = copy.deepcopy(model)
    assert merge_sibling_gemms(merged) == {"groups": 2, "gemms": 5}  # a, b, c (width 4) and d, e (width 3, bias)
    onnx.checker.check_model(merged)
    ops = [n.op_type for n in merged.graph.node]
    assert ops.count("Gemm") == 5 and ops.count("Split") == 2  # the two merged; n (its own width), f and g as they were
    for split in (n for n in merged.graph.node if n.op_type == "Split"):  # equal parts (ONNX Runtime's graph-safe path)
        assert len(set(numpy_helper.to_array(next(i for i in merged.graph.initializer if i.name == split.input[1])))) == 1
    kept = {i.name for i in merged.graph.initializer}
    assert {"wd", "wn"} <= kept and not {"wa", "wb", "wc", "bd", "we", "be"} & kept  # wd is still read by the MatMul
    out = _run(merged, feeds)
    for name, value in reference.items():
        np.testing.assert_allclose(out[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


def test_more_siblings_than_a_split_takes_merge_in_chunks(monkeypatch):
    from audioldm2_trt.export import sibling_gemms

    monkeypatch.setattr(sibling_gemms, "MAX_SPLIT_OUTPUTS", 2)
    model = _siblings_model()
    feeds = {"x": np.random.default_rng(2).standard_normal((M, K)).astype(np.float32)}
    reference = _run(model, feeds)
    assert merge_sibling_gemms(model) == {"groups": 2, "gemms": 4}  # (a, b) and (d, e); c is left alone in its chunk
    out = _run(model, feeds)
    for name, value in reference.items():
        np.testing.assert_allclose(out[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_lone_gemm_is_left_alone():
    model = _siblings_model()
    del model.graph.node[1:]  # only "a"
    del model.graph.output[1:]
    before = model.SerializeToString()
    assert merge_sibling_gemms(model) == {"groups": 0, "gemms": 0}
    assert model.SerializeToString() == before


def _unet_feeds(tiny_artifacts):
    from audioldm2_trt.export.components import BY_NAME, SampleShape, sample_inputs
    from audioldm2_trt.runtime.artifacts import load_artifacts

    consts = load_artifacts(tiny_artifacts).constants
    return {k: v.numpy() for k, v in sample_inputs(BY_NAME["unet"], consts, SampleShape(2, 9, 16), seed=4).items()}


def test_the_tiny_unets_time_embedding_projections_merge_and_run_the_same(tiny_artifacts):
    """On the exported (unfused) tiny UNet: every ResNet's time_emb_proj (with its bias) joins the GEMM of its width,
    and the UNet's output is unchanged."""
    from audioldm2_trt.export.validate import rel_l2

    model = onnx.load(str(tiny_artifacts / "unet.onnx"))
    projections = [n for n in model.graph.node if n.op_type == "Gemm" and "time_emb_proj" in n.name]
    widths = {next(i.dims[0] for i in model.graph.initializer if i.name == n.input[1]) for n in projections}
    feeds = _unet_feeds(tiny_artifacts)
    reference = _run(model, feeds)["noise_pred"]
    merged = copy.deepcopy(model)
    assert merge_sibling_gemms(merged) == {"groups": len(widths), "gemms": len(projections)} and len(widths) > 1
    assert not any("time_emb_proj" in n.name for n in merged.graph.node)
    assert rel_l2(_run(merged, feeds)["noise_pred"], reference) < 1e-6


def test_the_fused_recipe_merges_the_projections_after_their_biases_moved(tiny_artifacts):
    """UNET_FUSED's passes in order: fold_bias.py takes the projections' biases into the SkipGroupNorms, then the
    bias-free projections merge; the Split's outputs reach the SkipGroupNorms through the same Unsqueezes."""
    pytest.importorskip("torch")
    from onnxruntime.transformers.onnx_model import OnnxModel

    from audioldm2_trt.export.components import UNET_FUSED
    from audioldm2_trt.export.optimize import fuse

    model = OnnxModel(onnx.load(str(tiny_artifacts / "unet.onnx")))
    resnets = sum(n.op_type == "Gemm" and "time_emb_proj" in n.name for n in model.model.graph.node)
    fused, folded, _, merged = fuse(model, UNET_FUSED)
    assert folded["gemm"] == resnets and merged["gemms"] == resnets and merged["groups"] == 2  # the tiny's two widths
    nodes = fused.model.graph.node
    splits = [n for n in nodes if n.name.startswith("merged_gemm_") and n.op_type == "Split"]
    assert len(splits) == 2 and sum(len(s.output) for s in splits) == resnets
    for split in splits:
        gemm = next(n for n in nodes if n.output[0] == split.input[0])
        assert len(gemm.input) == 2  # no bias left to merge
        readers = {name: [n.op_type for n in nodes if name in n.input] for name in split.output}
        assert all(r == ["Unsqueeze"] for r in readers.values())
