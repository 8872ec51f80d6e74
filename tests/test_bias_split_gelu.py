"""export/bias_split_gelu.py: the GEGLU tails it replaces compute what BiasSplitGelu computes (its second half gated,
exact GELU), a GEGLU widened with zeros to the kernel's width gives the same feed-forward output, and nothing else
is touched. BiasSplitGelu has no CPU kernel: widened graphs are evaluated here with a float64 reference of it, and
the fused UNet itself is validated on the GPU (``audioldm2-trt validate --device cuda``)."""

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

    assert fuse_bias_split_gelu(model) == {"fused": 1, "padded": 0}
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
    assert fuse_bias_split_gelu(model) == {"fused": 0, "padded": 0}
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == before


def _feed_forward(width: int, shared: str | None = None, seed: int = 0):
    """x [1, TOKENS, DIM] → GEGLU of width 2H (as ``_geglu``) → MatMul(·, w_out [H, DIM]) → y, diffusers'
    FeedForward as the fused UNet has it; ``shared``: "w_in", "w_out" or "bias" is also read by another node."""
    model, w, b = _geglu(width, seed=seed)
    half = width // 2
    w_out = np.random.default_rng(seed + 7).standard_normal((half, DIM)).astype(np.float32) / 8
    graph = model.graph
    graph.node[-1].output[0] = "product"
    graph.node.append(helper.make_node("MatMul", ["product", "w_out"], ["y"], name="ff_out"))
    graph.initializer.append(numpy_helper.from_array(w_out, "w_out"))
    graph.value_info.append(helper.make_tensor_value_info("product", TensorProto.FLOAT, [1, TOKENS, half]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, DIM]))
    if shared:
        name = {"w_in": "w", "w_out": "w_out", "bias": "bias"}[shared]
        graph.node.append(helper.make_node("Identity", [name], ["copy"], name="copy"))
        graph.output.append(helper.make_tensor_value_info("copy", TensorProto.FLOAT, None))
    return model


def _evaluate_fused(model, x: np.ndarray) -> np.ndarray:
    """The MatMul → BiasSplitGelu → MatMul graph ``fuse_bias_split_gelu`` leaves, in float64 (BiasSplitGelu has no
    CPU kernel): ONNX Runtime's CUDA BiasSplitGelu by ``_bias_split_gelu_reference``."""
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    values = {"x": x.astype(np.float64)}
    for node in model.graph.node:
        a = [values[n] if n in values else inits[n] for n in node.input]
        if node.op_type == "MatMul":
            values[node.output[0]] = a[0] @ a[1]
        elif node.op_type == "BiasSplitGelu":
            values[node.output[0]] = _bias_split_gelu_reference(a[0], a[1])
        else:
            raise AssertionError(f"unexpected {node.op_type} in the widened graph")
    return values["y"]


@pytest.mark.parametrize("width, target", [(2048, 2560), (3072, 5120)])
def test_widened_geglu_gives_the_same_feed_forward_output(width, target):
    """AudioLDM 2's 256- and 384-channel GEGLUs (2H = 2048, 3072), widened with zeros to the kernel's next width:
    the feed-forward output is the unfused graph's (ONNX Runtime CPU) to float32 precision."""
    model = _feed_forward(width)
    x = np.random.default_rng(2).standard_normal((1, TOKENS, DIM)).astype(np.float32)
    y = _run(model, x)

    assert fuse_bias_split_gelu(model, pad=True) == {"fused": 0, "padded": 1}
    assert [n.op_type for n in model.graph.node] == ["MatMul", "BiasSplitGelu", "MatMul"]
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert shapes["w"] == (DIM, target) and shapes["bias"] == (target,) and shapes["w_out"] == (target // 2, DIM)
    assert "product" not in {v.name for v in model.graph.value_info}  # its recorded width is gone with it
    onnx.checker.check_model(model)
    widened = _evaluate_fused(model, x)
    assert np.linalg.norm(widened - y) / np.linalg.norm(y) < 1e-6


@pytest.mark.parametrize("shared", ["w_in", "w_out", "bias"])
def test_geglu_with_a_shared_weight_is_not_widened(shared):
    """Widening rewrites the weights in place: one that another node reads keeps the GEGLU as it is."""
    model = _feed_forward(2048, shared=shared)
    before = [(n.op_type, list(n.input)) for n in model.graph.node]
    assert fuse_bias_split_gelu(model, pad=True) == {"fused": 0, "padded": 0}
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == before
    assert {i.name: tuple(i.dims) for i in model.graph.initializer}["w"] == (DIM, 2048)


def test_geglu_is_not_widened_past_twice_its_width():
    model = _feed_forward(2048)
    assert fuse_bias_split_gelu(model, widths=(4097,), pad=True) == {"fused": 0, "padded": 0}
    assert fuse_bias_split_gelu(model, widths=(4096,), pad=True) == {"fused": 0, "padded": 1}


def test_kernel_widths_are_fused_as_they_are_when_padding():
    model = _feed_forward(5120)
    assert fuse_bias_split_gelu(model, pad=True) == {"fused": 1, "padded": 0}
    assert {i.name: tuple(i.dims) for i in model.graph.initializer}["w"] == (DIM, 5120)


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
    assert fuse_bias_split_gelu(allowed, widths=range(1, 1 << 20)) == {"fused": gelus, "padded": 0}
    assert not any(n.op_type == "Gelu" for n in allowed.graph.node)
    assert sum(n.op_type == "BiasSplitGelu" for n in allowed.graph.node) == gelus
    onnx.checker.check_model(allowed)

    # widened: every GEGLU's projection and the feed-forward MatMul after it are the ones the pass can widen
    producer = {o: n for n in fused.graph.node for o in n.output}
    inits = {i.name: tuple(i.dims) for i in fused.graph.initializer}
    own = {inits[next(x for x in producer[producer[n.input[0]].input[0]].input if x in inits)][0]
           for n in fused.graph.node if n.op_type == "Gelu"}  # each GEGLU's 2H, from its bias Add
    padded = copy.deepcopy(fused)
    assert fuse_bias_split_gelu(padded, widths=tuple(w + 8 for w in own), pad=True) == {"fused": 0, "padded": gelus}
    inits = {i.name: tuple(i.dims) for i in padded.graph.initializer}
    producer = {o: n for n in padded.graph.node for o in n.output}
    for node in padded.graph.node:
        if node.op_type == "BiasSplitGelu":
            (target,) = inits[node.input[1]]
            assert target - 8 in own and inits[producer[node.input[0]].input[1]][-1] == target
            (after,) = [n for n in padded.graph.node if node.output[0] in n.input]
            assert after.op_type == "MatMul" and inits[after.input[1]][0] == target // 2
    onnx.checker.check_model(padded)
    assert fuse_bias_split_gelu(fused) == {"fused": 0, "padded": 0}  # the tiny widths are not the kernel's
