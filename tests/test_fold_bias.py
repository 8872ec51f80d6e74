"""export/fold_bias.py: biases moved into the SkipGroupNorm, SkipLayerNormalization or bias after them give the same
sums.

SkipGroupNorm and NhwcConv have no CPU kernel, so the first rewrite is checked on a small graph evaluated in float64
by ``_evaluate`` below (the ops' semantics as ONNX Runtime's CUDA kernels define them: SkipGroupNorm normalises
``X + skip + bias`` and outputs that sum too); the second and third run on ONNX Runtime's CPU provider, on small
graphs and on the tiny UNet itself. The fused UNet as a whole is validated on the GPU (``audioldm2-trt validate --device cuda``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from audioldm2_trt.export.fold_bias import fold_biases  # noqa: E402

N, H, W, C, CIN, TEMB, GROUPS = 2, 3, 5, 8, 6, 7, 4


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _evaluate(model, feeds: dict) -> dict:
    """Float64 evaluation of the few ops the test graphs use (NhwcConv with 1×1 kernels only: weight [M, 1, 1, C])."""
    values = {k: np.asarray(v, dtype=np.float64) for k, v in feeds.items()}
    values.update({i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer
                   if i.data_type == TensorProto.FLOAT})
    values.update({i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type != TensorProto.FLOAT})
    for node in model.graph.node:
        x = [values[name] if name else None for name in node.input]
        a = _attrs(node)
        if node.op_type == "NhwcConv":
            assert x[1].shape[1:3] == (1, 1)
            out = [np.einsum("nhwc,mc->nhwm", x[0], x[1][:, 0, 0, :]) + (x[2] if len(x) > 2 else 0)]
        elif node.op_type == "SkipGroupNorm":
            total = x[0] + x[3] + (x[4] if len(x) > 4 and x[4] is not None else 0)
            n, h, w, c = total.shape
            grouped = total.reshape(n, h * w, a["groups"], c // a["groups"])
            mean = grouped.mean(axis=(1, 3), keepdims=True)
            var = grouped.var(axis=(1, 3), keepdims=True)
            y = ((grouped - mean) / np.sqrt(var + a["epsilon"])).reshape(total.shape) * x[1] + x[2]
            out = [y * (1 / (1 + np.exp(-y))) if a["activation"] else y, total]
        elif node.op_type == "Gemm":
            out = [a.get("alpha", 1.0) * x[0] @ (x[1].T if a.get("transB") else x[1])
                   + (a.get("beta", 1.0) * x[2] if len(x) > 2 else 0)]
        elif node.op_type == "Unsqueeze":
            out = [np.expand_dims(x[0], tuple(int(v) for v in x[1]))]
        elif node.op_type in ("Add", "MatMul"):
            out = [x[0] + x[1] if node.op_type == "Add" else x[0] @ x[1]]
        elif node.op_type == "Reshape":
            out = [x[0].reshape(tuple(int(v) for v in x[1]))]
        else:
            raise NotImplementedError(node.op_type)
        values.update({name: value for name, value in zip(node.output, out) if name})
    return {o.name: values[o.name] for o in model.graph.output}


def _resnet_tail(extra_conv_reader=False, gemm_beta=1.0, gemm_bias_shape=(C,)):
    """A ResNet as the fused UNet has it: conv1 → SkipGroupNorm(skip = time-embedding Gemm unsqueezed to
    [N, 1, 1, C]) → conv2; conv_shortcut(x) and conv2 → SkipGroupNorm (the next block's norm, which outputs the sum)."""
    rng = np.random.default_rng(0)

    def init(name, *shape, dtype=np.float32):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name)

    inits = [init("w1", C, 1, 1, CIN), init("b1", C), init("w2", C, 1, 1, C), init("b2", C),
             init("ws", C, 1, 1, CIN), init("bs", C), init("wt", C, TEMB), init("bt", *gemm_bias_shape),
             init("g1", C), init("be1", C), init("g2", C), init("be2", C), init("b_norm2", C),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2")]
    norm = {"epsilon": 1e-5, "groups": GROUPS, "channels_last": 1}
    nodes = [
        helper.make_node("NhwcConv", ["x", "w1", "b1"], ["h1"], name="conv1", domain="com.microsoft"),
        helper.make_node("Gemm", ["temb", "wt", "bt"], ["t"], name="temb_proj", transB=1, beta=gemm_beta),
        helper.make_node("Unsqueeze", ["t", "ax1"], ["t1"], name="unsqueeze1"),
        helper.make_node("Unsqueeze", ["t1", "ax2"], ["t2"], name="unsqueeze2"),
        helper.make_node("SkipGroupNorm", ["h1", "g1", "be1", "t2"], ["n1"], name="norm1", domain="com.microsoft",
                         activation=1, **norm),
        helper.make_node("NhwcConv", ["n1", "w2", "b2"], ["h2"], name="conv2", domain="com.microsoft"),
        helper.make_node("NhwcConv", ["x", "ws", "bs"], ["shortcut"], name="conv_shortcut", domain="com.microsoft"),
        helper.make_node("SkipGroupNorm", ["shortcut", "g2", "be2", "h2", "b_norm2"], ["y", "sum"], name="norm2",
                         domain="com.microsoft", activation=0, **norm),
    ]
    outputs = ["y", "sum"]
    if extra_conv_reader:
        nodes.append(helper.make_node("Add", ["h1", "h1"], ["h1_twice"], name="reads_h1"))
        outputs.append("h1_twice")
    graph = helper.make_graph(
        nodes, "resnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, H, W, CIN]),
                          helper.make_tensor_value_info("temb", TensorProto.FLOAT, [N, TEMB])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [N, H, W, C]) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _feeds():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((N, H, W, CIN)), "temb": rng.standard_normal((N, TEMB))}


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_resnet_biases_move_into_the_skip_group_norms():
    model = _resnet_tail()
    reference = _evaluate(model, _feeds())
    assert fold_biases(model) == {"conv": 3, "gemm": 1, "linear": 0, "layer_norm": 0}
    by_name = {n.name: n for n in model.graph.node}
    assert all(len(by_name[c].input) == 2 for c in ("conv1", "conv2", "conv_shortcut"))  # no bias left
    assert len(by_name["temb_proj"].input) == 2
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in _resnet_tail().graph.initializer}
    np.testing.assert_allclose(inits[by_name["norm1"].input[4]], original["b1"] + original["bt"], rtol=1e-6)
    np.testing.assert_allclose(inits[by_name["norm2"].input[4]],
                               original["b_norm2"] + original["b2"] + original["bs"], rtol=1e-6)
    folded = _evaluate(model, _feeds())
    for name in ("y", "sum"):  # the normalised output and the sum the next block reads as its residual
        assert _rel(folded[name], reference[name]) < 1e-6  # the summed bias is stored in float32
    onnx.checker.check_model(model)
    assert fold_biases(model) == {"conv": 0, "gemm": 0, "linear": 0, "layer_norm": 0}  # nothing left to move


@pytest.mark.parametrize("case", ["conv output read twice", "Gemm with beta 2", "Gemm bias of shape [1, C]"])
def test_biases_that_cannot_move_stay(case):
    model = {"conv output read twice": lambda: _resnet_tail(extra_conv_reader=True),
             "Gemm with beta 2": lambda: _resnet_tail(gemm_beta=2.0),
             "Gemm bias of shape [1, C]": lambda: _resnet_tail(gemm_bias_shape=(1, C))}[case]()
    reference = _evaluate(model, _feeds())
    counts = fold_biases(model)
    by_name = {n.name: n for n in model.graph.node}
    if case == "conv output read twice":
        assert counts == {"conv": 2, "gemm": 1, "linear": 0, "layer_norm": 0} and len(by_name["conv1"].input) == 3
    else:
        assert counts == {"conv": 3, "gemm": 0, "linear": 0, "layer_norm": 0} and len(by_name["temb_proj"].input) == 3
    folded = _evaluate(model, _feeds())
    for name in reference:
        assert _rel(folded[name], reference[name]) < 1e-6  # the summed bias is stored in float32


def _feed_forward_tail(sum_read_twice=False):
    """h → Add(bias) → Add(residual) → MatMul(W_out) → Reshape → Add(b_out): a transformer's feed-forward output into
    proj_out, as the unfused UNet has it."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "b_ff"),
             numpy_helper.from_array(rng.standard_normal((C, C)).astype(np.float32), "w_out"),
             numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "b_out"),
             numpy_helper.from_array(np.array([N, H, W, C], np.int64), "nhwc")]
    nodes = [helper.make_node("Add", ["h", "b_ff"], ["hb"], name="ff_bias"),
             helper.make_node("Add", ["hb", "r"], ["s"], name="residual"),
             helper.make_node("MatMul", ["s", "w_out"], ["p"], name="proj_out"),
             helper.make_node("Reshape", ["p", "nhwc"], ["p4"], name="to_nhwc"),
             helper.make_node("Add", ["p4", "b_out"], ["y"], name="proj_out_bias")]
    outputs = ["y"] + (["s"] if sum_read_twice else [])
    graph = helper.make_graph(nodes, "ff", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [N, H * W, C])
                                            for n in ("h", "r")],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [N, H, W, C] if o == "y" else [N, H * W, C])
                               for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_feed_forward_bias_folds_through_proj_out():
    model = _feed_forward_tail()
    rng = np.random.default_rng(3)
    feeds = {"h": rng.standard_normal((N, H * W, C)), "r": rng.standard_normal((N, H * W, C))}
    reference = _evaluate(model, feeds)
    assert fold_biases(model) == {"conv": 0, "gemm": 0, "linear": 1, "layer_norm": 0}
    assert [n.name for n in model.graph.node] == ["residual", "proj_out", "to_nhwc", "proj_out_bias"]
    assert _rel(_evaluate(model, feeds)["y"], reference["y"]) < 1e-6

    kept = _feed_forward_tail(sum_read_twice=True)  # the sum with its bias is an output: it must stay as it was
    assert fold_biases(kept)["linear"] == 0 and len(kept.graph.node) == 5


def _proj_in_norm(case: str = ""):
    """x → MatMul(W_in) → Add(b) → LayerNorm (gamma, beta) → y, the sum also → Add(r) → residual: a transformer's
    proj_in, norm1 and its residual stream. ``case`` spoils one condition of the rewrite."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((CIN, C)).astype(np.float32), "w_in"),
             numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "b_in"),
             numpy_helper.from_array((1 + rng.standard_normal(C) / 4).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "beta")]
    axis = 1 if case == "normalised over another axis" else -1
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["m"], name="proj_in"),
             helper.make_node("Add", ["m", "b_in"], ["s"], name="proj_in_bias"),
             helper.make_node("LayerNormalization", ["s", "gamma", "beta"],
                              ["y"] + (["mean"] if case == "mean read" else []), name="norm1", axis=axis, epsilon=1e-5),
             helper.make_node("Add", ["s", "r"], ["residual"], name="residual")]
    outputs = ["y", "residual"] + (["mean"] if case == "mean read" else [])
    if case == "weight shared":
        nodes.append(helper.make_node("MatMul", ["x", "w_in"], ["m2"], name="other"))
        outputs.append("m2")
    if case == "product read elsewhere":
        outputs.append("m")
    graph = helper.make_graph(
        nodes, "proj_in", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, H * W, CIN]),
                           helper.make_tensor_value_info("r", TensorProto.FLOAT, [N, H * W, C])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [N, H * W, 1 if o == "mean" else C]) for o in outputs],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run_cpu(model, feeds: dict) -> dict:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v.astype(np.float32) for k, v in feeds.items()})))


def test_proj_in_bias_and_norm1_become_one_skip_layer_norm():
    """Rewrite 3 on ONNX Runtime's CPU provider: the normalised output and the residual stream as before, the
    Add and the LayerNorm gone, proj_in's weight halved."""
    model = _proj_in_norm()
    rng = np.random.default_rng(6)
    feeds = {"x": rng.standard_normal((N, H * W, CIN)), "r": rng.standard_normal((N, H * W, C))}
    reference = _run_cpu(model, feeds)
    assert fold_biases(model, rewrites=("layer_norm",)) == {"conv": 0, "gemm": 0, "linear": 0, "layer_norm": 1}
    assert [n.op_type for n in model.graph.node] == ["MatMul", "SkipLayerNormalization", "Add"]
    fused = model.graph.node[1]
    assert fused.domain == "com.microsoft" and list(fused.input) == ["m", "m", "gamma", "beta", "b_in"]
    assert list(fused.output) == ["y", "", "", "s"]
    original = {i.name: numpy_helper.to_array(i) for i in _proj_in_norm().graph.initializer}
    weight = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}["w_in"]
    np.testing.assert_array_equal(weight * 2, original["w_in"])
    onnx.checker.check_model(model)
    folded = _run_cpu(model, feeds)
    for name in ("y", "residual"):
        assert _rel(folded[name], reference[name]) < 1e-6


@pytest.mark.parametrize("case", ["weight shared", "product read elsewhere", "mean read", "normalised over another axis"])
def test_proj_in_bias_stays_where_the_rewrite_would_change_something_else(case):
    model = _proj_in_norm(case)
    before = [(n.op_type, list(n.input)) for n in model.graph.node]
    assert fold_biases(model)["layer_norm"] == 0
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == before


def test_unknown_rewrite_is_refused():
    with pytest.raises(ValueError, match="unknown bias rewrites"):
        fold_biases(_proj_in_norm(), rewrites=("layer_norms",))


def test_the_tiny_unet_folds_every_feed_forward_bias_and_runs_the_same(tiny_artifacts):
    """On the exported (unfused) tiny UNet, on ONNX Runtime's CPU provider: each transformer's feed-forward bias
    folds through its proj_out, its proj_in bias and norm1 become one SkipLayerNormalization, and the UNet's output
    is unchanged."""
    ort = pytest.importorskip("onnxruntime")
    from audioldm2_trt.export.components import BY_NAME, SampleShape, sample_inputs
    from audioldm2_trt.export.validate import rel_l2
    from audioldm2_trt.runtime.artifacts import load_artifacts

    model = onnx.load(str(tiny_artifacts / "unet.onnx"))
    transformers = sum(n.op_type == "MatMul" and "/ff/net.2/" in n.name for n in model.graph.node)
    consts = load_artifacts(tiny_artifacts).constants
    feeds = {k: v.numpy() for k, v in sample_inputs(BY_NAME["unet"], consts, SampleShape(2, 9, 16), seed=4).items()}

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]

    reference = run(model)
    folded = copy.deepcopy(model)
    counts = fold_biases(folded)
    assert counts["linear"] == transformers > 0
    assert counts["layer_norm"] == transformers  # each proj_in bias and norm1 as one SkipLayerNormalization
    assert len(folded.graph.node) == len(model.graph.node) - 2 * transformers
    assert rel_l2(run(folded), reference) < 1e-6


def test_the_fused_tiny_unet_moves_each_resnet_and_transformer_bias(tiny_artifacts):
    """The patterns are the ones the fused export writes: every ResNet's time-embedding bias and conv1 bias move into
    its SkipGroupNorm, every feed-forward bias folds into proj_out's, and the graph stays valid."""
    pytest.importorskip("torch")
    from onnxruntime.transformers.onnx_model import OnnxModel

    from audioldm2_trt.export.components import UNET_FUSED
    from audioldm2_trt.export.optimize import _fuse

    fused = _fuse(OnnxModel(onnx.load(str(tiny_artifacts / "unet.onnx"))), UNET_FUSED).model
    resnets = sum(n.op_type == "Gemm" and "time_emb_proj" in n.name for n in fused.graph.node)
    feed_forwards = sum(n.op_type == "MatMul" and "/ff/net.2/" in n.name for n in fused.graph.node)
    convs = sum(n.op_type == "NhwcConv" for n in fused.graph.node)
    norms = sum(n.op_type == "LayerNormalization" for n in fused.graph.node)
    counts = fold_biases(fused)
    assert resnets > 0 and counts["gemm"] == resnets and counts["linear"] == feed_forwards > 0
    assert counts["layer_norm"] == norms == feed_forwards  # each transformer's norm1, after its proj_in
    assert not any(n.op_type == "LayerNormalization" for n in fused.graph.node)
    assert resnets <= counts["conv"] < convs  # conv1 of each ResNet at least; conv_in and conv_out keep theirs
    producer = {out: n for n in fused.graph.node for out in n.output}
    for node in fused.graph.node:  # each ResNet's conv1 now feeds its SkipGroupNorm without a bias
        if node.op_type == "SkipGroupNorm" and producer.get(node.input[3], node).op_type == "Unsqueeze":
            assert len(producer[node.input[0]].input) == 2 and node.input[4]
    fused.opset_import.append(helper.make_opsetid("com.microsoft", 1))  # as to_fp16 adds it
    onnx.checker.check_model(fused)
    assert fold_biases(fused) == {"conv": 0, "gemm": 0, "linear": 0, "layer_norm": 0}
