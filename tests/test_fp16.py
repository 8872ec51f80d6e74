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


def _fp16_copy(tiny_artifacts, tmp_path, name, fused=False, unet_layout="nhwc"):
    from audioldm2_trt.export.components import BY_NAME, FP16_PLAIN, UNET_LAYOUTS, VAE_FUSED
    from audioldm2_trt.export.onnx_export import save_model
    from audioldm2_trt.export.optimize import to_fp16

    path = tmp_path / f"{name}.onnx"
    shutil.copy(tiny_artifacts / f"{name}.onnx", path)
    if fused:
        recipe = {"unet": UNET_LAYOUTS[unet_layout], "vae_decoder": VAE_FUSED}[name]
    else:  # components kept fp32 by default are still converted here, to test the converter
        recipe = BY_NAME[name].fp16 if not BY_NAME[name].fp16.keep_fp32 else FP16_PLAIN
    summary = to_fp16(path, recipe, save_model)
    return path, summary


def _masked_softmax_count(model) -> int:
    from audioldm2_trt.export.attention_bias import masked_attention_outputs

    return len(masked_attention_outputs(model, "encoder_attention_mask_1"))


# The attention-only variant of the UNet fusion: the other fused kernels (GroupNorm, NhwcConv, packed Q/K/V) exist
# on CUDA only, so this is the part of the fused recipe that the CPU can run against the unfused graph.
_ATTENTION_ONLY = tuple((k, False) for k in (
    "enable_packed_qkv", "enable_packed_kv", "enable_bias_splitgelu", "enable_group_norm", "enable_skip_group_norm",
    "enable_nhwc_conv", "enable_bias_add", "enable_skip_layer_norm", "enable_bias_skip_layer_norm"))


def _fused_unet_on_cpu(tiny_artifacts, attention_mask_input, fusion_options=_ATTENTION_ONLY):
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    from audioldm2_trt.export.components import Fp16Recipe
    from audioldm2_trt.export.optimize import _fuse

    recipe = Fp16Recipe(fusion="unet", fusion_options=fusion_options, attention_mask_input=attention_mask_input)
    return _fuse(OnnxModel(onnx.load(str(tiny_artifacts / "unet.onnx"))), recipe).model


def _unet_feeds(tiny_artifacts):
    from audioldm2_trt.export.components import BY_NAME, SampleShape, sample_inputs
    from audioldm2_trt.runtime.artifacts import load_artifacts

    consts = load_artifacts(tiny_artifacts).constants
    feeds = {k: v.numpy() for k, v in sample_inputs(BY_NAME["unet"], consts, SampleShape(2, 9, 16), seed=4).items()}
    assert feeds["encoder_attention_mask_1"][1, -1] == 0  # the second row has T5 padding
    return feeds


def _run_cpu(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def test_fused_attention_keeps_the_t5_mask(tiny_artifacts):
    """Fused attention with the mask handed back as attention_bias equals the unfused graph (fp32, CPU);
    ORT's stock fusion, which drops the mask, does not — so this comparison sees a lost mask."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from audioldm2_trt.export.validate import rel_l2

    fp32 = onnx.load(str(tiny_artifacts / "unet.onnx"))
    feeds = _unet_feeds(tiny_artifacts)
    reference = _run_cpu(fp32, feeds)

    fused = _fused_unet_on_cpu(tiny_artifacts, "encoder_attention_mask_1")
    kinds = [n.op_type for n in fused.graph.node]
    assert kinds.count("MultiHeadAttention") + kinds.count("Attention") == sum(
        n.op_type == "Softmax" for n in fp32.graph.node)  # every attention fused
    assert rel_l2(_run_cpu(fused, feeds), reference) < 1e-5

    options = FusionOptions("unet")
    for key, value in _ATTENTION_ONLY:
        setattr(options, key, value)
    stock = optimize_model(onnx.load(str(tiny_artifacts / "unet.onnx")), model_type="unet", opt_level=0,
                           optimization_options=options, use_gpu=True).model
    assert "encoder_attention_mask_1" not in [i.name for i in stock.graph.input]
    assert rel_l2(_run_cpu(stock, feeds), reference) > 1e-3


def test_masked_attention_left_unfused_keeps_its_mask(tiny_artifacts, caplog):
    """If ONNX Runtime's fusion leaves the masked attentions alone (here: attention fusion off), they keep their own
    mask: the graph still equals the unfused one, with a warning that they run unfused."""
    import onnx

    from audioldm2_trt.export.validate import rel_l2

    feeds = _unet_feeds(tiny_artifacts)
    reference = _run_cpu(onnx.load(str(tiny_artifacts / "unet.onnx")), feeds)
    with caplog.at_level("WARNING", logger="audioldm2_trt.export"):
        fused = _fused_unet_on_cpu(tiny_artifacts, "encoder_attention_mask_1",
                                   _ATTENTION_ONLY + (("enable_attention", False),))
    assert "MultiHeadAttention" not in [n.op_type for n in fused.graph.node]
    assert "7 of 7 attentions masked by encoder_attention_mask_1 were left unfused" in caplog.text
    assert rel_l2(_run_cpu(fused, feeds), reference) < 1e-5


def test_a_masked_attention_that_vanished_is_an_error(tiny_artifacts):
    """A masked attention whose output chain is gone with no fused node to carry the mask: refused."""
    import onnx

    from audioldm2_trt.export.attention_bias import AttentionMaskError, attach_mask_bias, masked_attention_outputs

    model = onnx.load(str(tiny_artifacts / "unet.onnx"))
    chains = masked_attention_outputs(model, "encoder_attention_mask_1")
    mask = next(i for i in model.graph.input if i.name == "encoder_attention_mask_1")
    with pytest.raises(AttentionMaskError, match="mask 'encoder_attention_mask_1'.* fused into nothing"):
        attach_mask_bias(model, mask, chains + [("a_softmax_no_node_writes", {"a_tensor_no_node_writes"})])


def _elem_types(model):
    import onnx

    return {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type) for i in model.graph.input}


@pytest.mark.parametrize("name,layout", [("unet", "nhwc"), ("unet", "nchw"), ("vae_decoder", "nhwc")])
def test_fused_graph_keeps_inputs_and_resize_parameters(tiny_artifacts, tmp_path, name, layout):
    import onnx

    fp32 = onnx.load(str(tiny_artifacts / f"{name}.onnx"))
    path, summary = _fp16_copy(tiny_artifacts, tmp_path, name, fused=True, unet_layout=layout)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    boundary = _elem_types(model)
    if name == "unet":  # the text-only work in the context graph (hoist_context.py), which reads the text inputs
        context = onnx.load(str(tmp_path / summary["context"]["file"]))
        onnx.checker.check_model(context)
        outputs = summary["context"]["outputs"]
        assert [o.name for o in context.graph.output] == outputs and {boundary.pop(o) for o in outputs} == {"FLOAT16"}
        assert summary["context"]["step_inputs"] == [i.name for i in model.graph.input]
        assert summary["context"]["unpacked_kv"] > 0
        boundary.update(_elem_types(context))
    assert boundary == _elem_types(fp32)  # same names, float32/int64 at the boundary
    assert [o.name for o in model.graph.output] == [o.name for o in fp32.graph.output]
    assert summary["fused"].get("GroupNorm", 0) > 0
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    if layout == "nhwc":
        assert summary["fused"].get("NhwcConv", 0) > 0 and convs == 0
    else:  # export --unet-layout nchw: every convolution a plain Conv, whose weights the runtime can pack
        assert "NhwcConv" not in summary["fused"] and convs == sum(n.op_type == "Conv" for n in fp32.graph.node) > 0
    if name == "unet":  # attention fused, and the T5 mask still reaches the graph as attention_bias
        assert summary["fused"].get("MultiHeadAttention", 0) > 0
        biased = [n for n in model.graph.node if n.op_type == "MultiHeadAttention" and len(n.input) > 5 and n.input[5]]
        assert len(biased) == _masked_softmax_count(fp32) > 0
        assert any("encoder_attention_mask_1" in n.input for n in context.graph.node)
    else:
        assert "MultiHeadAttention" not in summary["fused"] and "Attention" not in summary["fused"]
    moved = [t for t in model.graph.initializer if t.name.startswith("folded_bias_")]
    if name == "unet" and layout == "nhwc":  # export/fold_bias.py, recorded in the manifest
        folded = summary["folded_biases"]
        assert folded["linear"] > 0 and folded["conv"] > 0 and folded["gemm"] > 0
        assert moved and all(t.data_type == onnx.TensorProto.FLOAT16 for t in moved)  # the kernels take bias as T
    else:  # the VAE decoder does not fold (its 100-prompt fidelity got worse, run AD); NCHW was measured without it
        assert "folded_biases" not in summary and not moved
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


@pytest.mark.parametrize("name", ["gpt2", "clap_text", "vocoder", "unet", "t5_encoder", "clap_audio"])
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


def test_t5_keeps_wo_norms_and_scores_fp32(tiny_artifacts, tmp_path):
    """The T5 recipe's allow-list: the q/k/v/o and wi projections' weights and the embedding table are fp16, wo's and
    everything else's fp32; the score MatMuls, Softmax, norms (Pow/ReduceMean/Sqrt) and residual Adds compute in
    fp32."""
    import onnx

    path, summary = _fp16_copy(tiny_artifacts, tmp_path, "t5_encoder")
    model = onnx.load(str(path))
    init = {t.name: t.data_type for t in model.graph.initializer}
    embedding = [n for n in model.graph.node if n.op_type == "Gather" and n.name.endswith("/embed_tokens/Gather")]
    assert len(embedding) == 1 and init[embedding[0].input[0]] == onnx.TensorProto.FLOAT16
    weight_type = {}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            w = [init[i] for i in node.input if i in init]
            weight_type[node.name] = w[0] if w else None
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    layers = {n.split("/layer.")[0] for n in weight_type if "/block." in n}
    assert len(layers) == 2  # the tiny T5's blocks
    for name, dtype in weight_type.items():
        if name.endswith(("/q/MatMul", "/k/MatMul", "/v/MatMul", "/o/MatMul", "/wi_0/MatMul", "/wi_1/MatMul")):
            assert dtype == fp16, name
        elif name.endswith("/wo/MatMul"):
            assert dtype == fp32, name
        else:  # the attention score and value products have no weights; they must read fp32 tensors
            assert dtype is None, name
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    checked = 0
    for node in model.graph.node:
        if node.op_type in ("Softmax", "Pow", "ReduceMean", "Sqrt", "Add", "Mul", "Tanh") or (
                node.op_type == "MatMul" and weight_type[node.name] is None):
            assert all(types[o] != fp16 for o in node.output), node.name  # (int64 position arithmetic included)
            checked += 1
    fp16_outputs = {types[o] for n in model.graph.node if n.op_type == "MatMul" and weight_type[n.name] == fp16
                    for o in n.output}
    assert checked > 50 and fp16_outputs == {fp16}
    assert summary["fp16_nodes"]


def test_t5_embedding_table_in_fp16_changes_no_output_bit(tiny_artifacts, tmp_path):
    """The fp16 table gives the same encoder output, bit for bit, as the fp32 table the recipe kept before: that graph
    rounded each looked-up row to fp16 before the first norm (CPU, both optimisation levels)."""
    import dataclasses

    import onnx

    from audioldm2_trt.export.components import BY_NAME
    from audioldm2_trt.export.optimize import to_fp16
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    recipe = BY_NAME["t5_encoder"].fp16
    before = dataclasses.replace(recipe, fp16_nodes=recipe.fp16_nodes.replace("|/embed_tokens/Gather$", ""))
    assert before.fp16_nodes != recipe.fp16_nodes
    paths = {}
    for label, r in (("now", recipe), ("before", before)):
        paths[label] = tmp_path / f"t5_{label}.onnx"
        shutil.copy(tiny_artifacts / "t5_encoder.onnx", paths[label])
        to_fp16(paths[label], r, lambda m, p: onnx.save(m, str(p)))
    tables = {label: {t.name: t.data_type for t in onnx.load(str(p)).graph.initializer}["t5.shared.weight"]
              for label, p in paths.items()}
    assert tables == {"now": onnx.TensorProto.FLOAT16, "before": onnx.TensorProto.FLOAT}
    rng = np.random.default_rng(5)
    mask = np.ones((2, 11), np.int64)
    mask[1, 7:] = 0
    feeds = {"input_ids": rng.integers(0, 100, (2, 11)).astype(np.int64), "attention_mask": mask}
    for level in ("disable", "all"):
        factory = OrtSessionFactory("cpu", graph_optimization=level)
        out = {label: factory.create("t5_encoder", p).run(feeds)["last_hidden_state"] for label, p in paths.items()}
        np.testing.assert_array_equal(out["now"], out["before"])


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


@needs_export
def test_group_norm_fusion_given_the_pass_map_writes_the_same_graph(tiny_artifacts, monkeypatch):
    """The export hands ONNX Runtime's GroupNorm fusion the node map of its pass (optimize.py: the map it rebuilt for
    every node it visited was 70 s of the full-size UNet's export): the fused UNet, with the default recipe's fusions,
    is the same graph byte for byte as without it, and the fusion found GroupNorms with Swish in it."""
    import contextlib

    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    from audioldm2_trt.export import optimize
    from audioldm2_trt.export.components import UNET_FUSED

    from onnxruntime.transformers import optimizer as ort_optimizer

    used = ort_optimizer.OnnxModel  # the class the optimizer's models derive from (its modules' top-level names)
    given_a_map = []
    find = used.find_first_child_by_type

    def spy(self, node, child_type, input_name_to_nodes=None, recursive=True):
        given_a_map.append(input_name_to_nodes is not None)
        return find(self, node, child_type, input_name_to_nodes, recursive)

    monkeypatch.setattr(used, "find_first_child_by_type", spy)

    def fused():
        given_a_map.clear()
        model = optimize._fuse(OnnxModel(onnx.load(str(tiny_artifacts / "unet.onnx"))), UNET_FUSED).model
        return model, sum(given_a_map)

    with_map, searches_with_map = fused()
    monkeypatch.setattr(optimize, "_group_norm_children_from_the_pass_map", contextlib.nullcontext)
    without, searches_without = fused()
    assert searches_with_map > searches_without  # the GroupNorm fusion's searches were given the map
    swish = [n for n in with_map.graph.node if n.op_type == "GroupNorm"
             and any(a.name == "activation" and a.i == 1 for a in n.attribute)]
    assert swish, "no GroupNorm with Swish fused: the comparison would not exercise the Swish search"
    assert with_map.SerializeToString() == without.SerializeToString()
