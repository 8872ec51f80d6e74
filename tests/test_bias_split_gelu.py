"""export/bias_split_gelu.py: the GEGLU tails it replaces compute what BiasSplitGelu computes (its second half gated,
exact GELU), and nothing else is touched. BiasSplitGelu has no CPU kernel: the fused UNet itself is validated on
the GPU (``audioldm2-trt validate --device cuda``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from audioldm2_trt.export.bias_split_gelu import fuse_bias_split_gelu  # noqa: E402

DIM, TOKENS = 16, 6


def _geglu(width: int, gated_half: str = "second", extra_reader: bool = False, seed: int = 0):
    """x [1, TOKENS, DIM] → MatMul → Add(bias, ·) → Slice halves → Gelu on one → Mul, as the fused UNet has it."""
    rng = np.random.default_rng(seed)
    half = width // 2
    w = rng.standard_normal((DIM, width)).astype(np.float32) / 4
    b = rng.standard_normal(width).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "bias"),
             numpy_helper.from_array(np.array([0]), "s0"), numpy_helper.from_array(np.array([half]), "e0"),
             numpy_helper.from_array(np.array([half]), "s1"), numpy_helper.from_array(np.array([width]), "e1"),
             numpy_helper.from_array(np.array([-1]), "axis")]
    first, second = ("left", "right") if gated_half == "second" else ("right", "left")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["bias", "mm"], ["proj"], name="add"),
             helper.make_node("Slice", ["proj", "s0", "e0", "axis"], [first], name="slice0"),
             helper.make_node("Slice", ["proj", "s1", "e1", "axis"], [second], name="slice1"),
             helper.make_node("Gelu", ["right"], ["gate"], name="gelu", domain="com.microsoft"),
             helper.make_node("Mul", ["left", "gate"], ["y"], name="mul")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, half])]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["proj"], ["proj_copy"], name="copy"))
        outputs.append(helper.make_tensor_value_info("proj_copy", TensorProto.FLOAT, [1, TOKENS, width]))
    graph = helper.make_graph(nodes, "geglu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, DIM])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model, w, b


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def _bias_split_gelu_reference(mm: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """ONNX Runtime's BiasSplitGelu (contrib_ops/cuda/diffusion): (x+b)[..., :H] · gelu_erf((x+b)[..., H:]), float64."""
    z = mm.astype(np.float64) + bias.astype(np.float64)
    half = z.shape[-1] // 2
    right = z[..., half:]
    gelu = right * 0.5 * (1.0 + np.vectorize(math.erf)(right / math.sqrt(2.0)))
    return z[..., :half] * gelu


def test_fused_tail_is_what_bias_split_gelu_computes():
    model, w, b = _geglu(5120)
    x = np.random.default_rng(1).standard_normal((1, TOKENS, DIM)).astype(np.float32)
    y = _run(model, x)  # the unfused tail, ONNX Runtime CPU
    ref = _bias_split_gelu_reference(x.astype(np.float64) @ w.astype(np.float64), b)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5

    assert fuse_bias_split_gelu(model) == 1
    ops = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    assert ops == [("MatMul", ["x", "w"], ["mm"]), ("BiasSplitGelu", ["mm", "bias"], ["y"])]
    assert model.graph.node[1].domain == "com.microsoft"
    onnx.checker.check_model(model)


@pytest.mark.parametrize("case", ["width 2048 (no CUDA kernel)", "first half gated", "projection read elsewhere"])
def test_tails_the_kernel_cannot_replace_are_left_alone(case):
    model, _, _ = {"width 2048 (no CUDA kernel)": lambda: _geglu(2048),
                   "first half gated": lambda: _geglu(5120, gated_half="first"),
                   "projection read elsewhere": lambda: _geglu(5120, extra_reader=True)}[case]()
    before = [(n.op_type, list(n.input)) for n in model.graph.node]
    assert fuse_bias_split_gelu(model) == 0
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == before


def test_every_geglu_of_the_tiny_unet_matches(tiny_artifacts):
    """The pattern is the one the export writes: with every width allowed, each of the tiny fused UNet's GEGLUs
    (one Gelu each) becomes one BiasSplitGelu, and the graph stays valid."""
    pytest.importorskip("torch")
    import copy

    from audioldm2_trt.export.components import UNET_FUSED
    from audioldm2_trt.export.optimize import _fuse
    from onnxruntime.transformers.onnx_model import OnnxModel

    fused = _fuse(OnnxModel(onnx.load(str(tiny_artifacts / "unet.onnx"))), UNET_FUSED).model
    gelus = sum(n.op_type == "Gelu" for n in fused.graph.node)
    assert gelus > 0
    allowed = copy.deepcopy(fused)
    assert fuse_bias_split_gelu(allowed, widths=range(1, 1 << 20)) == gelus
    assert not any(n.op_type == "Gelu" for n in allowed.graph.node)
    assert sum(n.op_type == "BiasSplitGelu" for n in allowed.graph.node) == gelus
    onnx.checker.check_model(allowed)
    assert fuse_bias_split_gelu(fused) == 0  # the tiny widths are not the kernel's
