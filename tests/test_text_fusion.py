"""The text encoders' fused recipes (GPT2_FUSED with export/self_attention.py, T5_FUSED, CLAP_TEXT_MEA): each fused
graph computes what the graph before fusion, or diffusers' own GPT-2 loop, does.

The fp16 graphs run on CUDA only (MultiHeadAttention in half precision); here the same fusions on the fp32 graphs run on
ONNX Runtime's CPU provider, whose MultiHeadAttention, SkipLayerNormalization, SkipSimplifiedLayerNormalization,
FastGelu and BiasGelu take float. The fp16 artefacts are validated against PyTorch on the GPU (``audioldm2-trt validate
--device cuda``).
"""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import needs_export

pytestmark = needs_export


def _fused_fp32(path, out):
    """``path``'s GPT-2 graph with GPT2_FUSED's fusions, still fp32, saved at ``out``; returns its op counts."""
    import collections

    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    from audioldm2_trt.export.components import GPT2_FUSED
    from audioldm2_trt.export.optimize import fuse

    model, folded, *_ = fuse(OnnxModel(onnx.load(str(path))), GPT2_FUSED)
    onnx.checker.check_model(model.model)
    onnx.save(model.model, str(out))
    return collections.Counter(n.op_type for n in model.model.graph.node), folded


@pytest.mark.parametrize("graph", ["step", "unrolled"])
def test_fused_gpt2_equals_diffusers_generation_loop(tiny_pipe, tiny_artifacts, tmp_path, graph):
    """The fused graph, driven as the runtime drives it, against diffusers' ``generate_language_model``. The step
    graph's attention becomes MultiHeadAttention in every layer (its Softmax gone) and each attention output
    projection's bias moves into the SkipLayerNormalization after it; the unrolled graph's attentions read a KV cache,
    which the pattern does not take, and stay as they are."""
    import torch

    from audioldm2_trt.export.components import GPT2_GRAPHS, pipeline_constants
    from audioldm2_trt.export.onnx_export import export_component
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory
    from audioldm2_trt.runtime.conditioning import generate_lm_states

    consts = pipeline_constants(tiny_pipe)
    layers = tiny_pipe.language_model.config.n_layer
    source = tiny_artifacts / "gpt2.onnx"
    if graph == "unrolled":
        export_component(tiny_pipe, consts, "gpt2", tmp_path, spec=GPT2_GRAPHS["unrolled"])
        source = tmp_path / "gpt2.onnx"
    counts, folded = _fused_fp32(source, tmp_path / "fused.onnx")
    passes = 1 if graph == "step" else consts["max_new_tokens"]  # the unrolled graph: one copy of GPT-2 per step
    assert counts["SkipLayerNormalization"] >= (2 * layers - 1) * passes and counts["FastGelu"] == layers * passes
    if graph == "step":
        assert counts["MultiHeadAttention"] == layers and counts["Softmax"] == 0 and counts["Gemm"] == 0
        assert folded == {"gemm_into_skip_layer_norm": layers}
    else:
        assert counts["MultiHeadAttention"] == 0 and counts["Softmax"] > 0
    session = OrtSessionFactory("cpu").create("gpt2", tmp_path / "fused.onnx")
    gen = torch.Generator().manual_seed(5)
    embeds = torch.randn(2, 11, tiny_pipe.language_model.config.n_embd, generator=gen)
    mask = torch.ones(2, 11, dtype=torch.int64)
    mask[1, 6:9] = 0  # padding inside the sequence, as the projection makes it
    with torch.no_grad():
        ref = tiny_pipe.generate_language_model(embeds, attention_mask=mask, max_new_tokens=8).numpy()
    got = generate_lm_states(session, embeds.numpy(), mask.numpy(), 8, stepwise=graph == "step",
                             max_positions=consts["lm_max_positions"])
    assert got.shape == ref.shape
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def _attention_graph(divisor_is_constant=True, key_perm=(0, 2, 3, 1), extra_reader=False, gemm_reader=False):
    """One attention of the GPT-2 pattern over x [B, S, 8] (2 heads of 4), its bias an input [B, 1, S, S], then an
    output projection Gemm whose bias may move into the SkipLayerNormalization after it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d, heads = 8, 2
    inits = [numpy_helper.from_array(rng.standard_normal((d, 3 * d)).astype(np.float32), "w_qkv"),
             numpy_helper.from_array(np.array([d, d, d], np.int64), "split"),
             numpy_helper.from_array(np.array([0, 0, heads, d // heads], np.int64), "heads_shape"),
             numpy_helper.from_array(np.array([0, 0, d], np.int64), "merged_shape"),
             numpy_helper.from_array(np.array([-1, d], np.int64), "rows_shape"),
             numpy_helper.from_array(np.array([d], np.int64), "width"),
             numpy_helper.from_array(np.array([2.0], np.float32), "sqrt_h"),
             numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), "w_o"),
             numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), "b_o"),
             numpy_helper.from_array(np.ones(d, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(d, np.float32), "beta")]
    nodes = [helper.make_node("MatMul", ["x", "w_qkv"], ["qkv"]),
             helper.make_node("Split", ["qkv", "split"], ["q", "k", "v"], axis=2)]
    for name, perm in (("q", (0, 2, 1, 3)), ("k", key_perm), ("v", (0, 2, 1, 3))):
        nodes += [helper.make_node("Reshape", [name, "heads_shape"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}t"], perm=list(perm))]
    divisor = "sqrt_h" if divisor_is_constant else "divisor"
    nodes += [helper.make_node("MatMul", ["qt", "kt"], ["scores"]),
              helper.make_node("Div", ["scores", divisor], ["scaled"]),
              helper.make_node("Add", ["scaled", "bias"], ["biased"]),
              helper.make_node("Softmax", ["biased"], ["weights"], axis=-1),
              helper.make_node("MatMul", ["weights", "vt"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merged_shape"], ["attended"]),
              helper.make_node("Reshape", ["attended", "rows_shape"], ["rows"]),
              helper.make_node("Gemm", ["rows", "w_o", "b_o"], ["projected"]),
              helper.make_node("Reshape", ["projected", "merged_shape_b"], ["projected3"]),
              helper.make_node("Shape", ["x"], ["x_shape"], end=2),
              helper.make_node("Concat", ["x_shape", "width"], ["merged_shape_b"], axis=0),
              helper.make_node("SkipLayerNormalization", ["x", "projected3", "gamma", "beta"], ["y"],
                               domain="com.microsoft", epsilon=1e-5)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:  # the scores read by something else: the attention may not disappear
        nodes.append(helper.make_node("Identity", ["scores"], ["scores_out"]))
        outputs.append(helper.make_tensor_value_info("scores_out", TensorProto.FLOAT, None))
    if gemm_reader:  # the projection read elsewhere: its bias must stay in it
        nodes.append(helper.make_node("Identity", ["projected"], ["projected_out"]))
        outputs.append(helper.make_tensor_value_info("projected_out", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d]),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["B", 1, "S", "S"])]
    if not divisor_is_constant:
        inputs.append(helper.make_tensor_value_info("divisor", TensorProto.FLOAT, [1]))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _run(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def _feeds():
    rng = np.random.default_rng(1)
    b, s = 2, 6
    keep = np.ones((b, s), np.float32)
    keep[1, 4:] = 0
    causal = np.tril(np.ones((s, s), np.float32))
    bias = (1.0 - causal[None, None] * keep[:, None, None, :]) * -65504.0
    return {"x": rng.standard_normal((b, s, 8)).astype(np.float32), "bias": bias.astype(np.float32),
            "divisor": np.array([2.0], np.float32)}


def test_attention_and_gemm_bias_rewrites_keep_the_outputs():
    import copy

    from audioldm2_trt.export.self_attention import fuse_self_attention, gemm_bias_into_skip_layer_norm

    before = _attention_graph()
    after = copy.deepcopy(before)
    assert fuse_self_attention(after) == 1 and gemm_bias_into_skip_layer_norm(after) == 1
    ops = [n.op_type for n in after.graph.node]
    assert "MultiHeadAttention" in ops and "Gemm" not in ops
    attention = next(n for n in after.graph.node if n.op_type == "MultiHeadAttention")
    assert list(attention.input) == ["q", "k", "v", "", "", "bias"]
    assert {a.name: a.i if a.name == "num_heads" else a.f for a in attention.attribute} == {"num_heads": 2, "scale": 0.5}
    feeds = _feeds()
    np.testing.assert_allclose(_run(after, feeds)[0], _run(before, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["divisor_not_constant", "key_not_transposed_for_scores", "scores_read_elsewhere"])
def test_attention_that_differs_from_the_pattern_stays(case):
    import copy

    from audioldm2_trt.export.self_attention import fuse_self_attention

    before = _attention_graph(divisor_is_constant=case != "divisor_not_constant",
                              key_perm=(0, 2, 1, 3) if case == "key_not_transposed_for_scores" else (0, 2, 3, 1),
                              extra_reader=case == "scores_read_elsewhere")
    after = copy.deepcopy(before)
    assert fuse_self_attention(after) == 0
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]


def test_gemm_bias_stays_where_the_projection_has_another_reader():
    import copy

    from audioldm2_trt.export.self_attention import gemm_bias_into_skip_layer_norm

    before = _attention_graph(gemm_reader=True)
    after = copy.deepcopy(before)
    assert gemm_bias_into_skip_layer_norm(after) == 0
    feeds = _feeds()
    for got, ref in zip(_run(after, feeds), _run(before, feeds)):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name, fused_ops", [
    ("t5_encoder", {"SkipSimplifiedLayerNormalization", "FastGelu"}),
    ("clap_text", {"SkipLayerNormalization", "BiasGelu", "MultiHeadAttention"}),
])
def test_fused_text_encoders_keep_their_outputs(tiny_pipe, tiny_artifacts, name, fused_ops):
    """Fused as their default recipes say (fp32 here), on token ids with padding: the same outputs as before fusion;
    T5's attention stays unfused (its scores are fp32) and its allow-list of fp16 nodes still names the same nodes
    (the fusions leave its MatMuls and embedding alone)."""
    import re

    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.onnx_model import OnnxModel

    from audioldm2_trt.export.components import FUSED_RECIPES
    from audioldm2_trt.export.optimize import fuse

    recipe = FUSED_RECIPES[name]
    before = onnx.load(str(tiny_artifacts / f"{name}.onnx"))
    # (no onnx.checker here: T5's SimplifiedLayerNormalization is ONNX Runtime's op in the default domain)
    after, *_ = fuse(OnnxModel(onnx.load(str(tiny_artifacts / f"{name}.onnx"))), recipe)
    ops = {n.op_type for n in after.model.graph.node}
    assert fused_ops <= ops and ("MultiHeadAttention" in ops) == ("MultiHeadAttention" in fused_ops)
    if recipe.fp16_nodes:
        allowed = re.compile(recipe.fp16_nodes)
        assert sorted(n.name for n in after.model.graph.node if allowed.search(n.name)) == \
            sorted(n.name for n in before.graph.node if allowed.search(n.name))
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 900, (2, 16)).astype(np.int64)
    mask = np.ones((2, 16), np.int64)
    mask[1, 9:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    ref = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(after.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("recipe_name", ["CLAP_TEXT_ATTENTION", "CLAP_TEXT_MEA"])
@pytest.mark.parametrize("length, kept", [(16, 9), (11, 11)])
def test_clap_attention_as_multihead_attention_keeps_its_outputs(tiny_artifacts, length, kept, recipe_name):
    """CLAP_TEXT_ATTENTION (the default recipe of runs CN-CR): every layer's attention of CLAP's text branch becomes one
    MultiHeadAttention (the head count read from the projection's width, as the graph reshapes to [B, S, -1, H]),
    the padding bias is expanded over the queries once for all layers, and the outputs stay those of the unfused
    graph, with and without padding in the batch. ``CLAP_TEXT_MEA`` (the default since run CR) moves each attention's q/k/v
    bias Adds into its bias input too: no Add is left between those projections and the attention."""
    import collections

    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.onnx_model import OnnxModel

    from audioldm2_trt.export import components
    from audioldm2_trt.export.optimize import fuse

    assert components.FUSED_RECIPES["clap_text"] is components.CLAP_TEXT_MEA
    recipe = getattr(components, recipe_name)
    before = onnx.load(str(tiny_artifacts / "clap_text.onnx"))
    layers = sum(n.op_type == "Softmax" for n in before.graph.node)
    after, folded, *_ = fuse(OnnxModel(onnx.load(str(tiny_artifacts / "clap_text.onnx"))), recipe)
    onnx.checker.check_model(after.model)
    ops = collections.Counter(n.op_type for n in after.model.graph.node)
    assert layers > 1 and ops["MultiHeadAttention"] == layers and ops["Softmax"] == 0
    attentions = [n for n in after.model.graph.node if n.op_type == "MultiHeadAttention"]
    biases = {n.input[5] for n in attentions}
    assert len(biases) == 1 and next(iter(biases)).endswith("_over_queries")
    producers = {o: n for n in after.model.graph.node for o in n.output}
    if recipe.attention_qkv_bias:
        assert folded["qkv_bias_into_attention"] == layers
        inits = {i.name: i for i in after.model.graph.initializer}
        for n in attentions:
            assert [producers[x].op_type for x in n.input[:3]] == ["MatMul"] * 3
            widths = [inits[producers[x].input[1]].dims[1] for x in n.input[:3]]
            assert list(inits[n.input[3]].dims) == [sum(widths)]
    else:
        assert all(n.input[3] == "" for n in attentions)
        assert all(producers[x].op_type == "Add" for n in attentions for x in n.input[:3])
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 900, (2, length)).astype(np.int64)
    mask = np.ones((2, length), np.int64)
    mask[1, kept:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    ref = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(after.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
