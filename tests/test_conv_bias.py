"""export/conv_bias.py: each convolution's bias as an Add node after it, kept apart by the session — the same outputs
as the graph before (ONNX Runtime's CPU provider), the Add still there after ONNX Runtime's optimizer only where the
session disables ConvAddFusion, and the manifest entry and the runtime's session factory carrying that choice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from audioldm2_trt.runtime.errors import ArtifactError

from .conftest import _has, needs_export

pytestmark = pytest.mark.skipif(not _has("onnx"), reason="needs onnx (the export extra)")


def _conv_graph():
    """x [1, 3, 16] → Conv (bias) → LeakyRelu → Conv (dilated, bias) → + x' (a residual), and a bias-less Conv."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             [("w1", (4, 3, 3)), ("b1", (4,)), ("w2", (4, 4, 3)), ("b2", (4,)), ("w3", (4, 3, 1))]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1], name="conv1"),
             helper.make_node("LeakyRelu", ["c1"], ["r"], alpha=0.1),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], pads=[2, 2], dilations=[2], name="conv2"),
             helper.make_node("Conv", ["x", "w3"], ["c3"], name="conv3"),
             helper.make_node("Add", ["c2", "c3"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x, disabled=None, optimized=None, feed="x", extended_only=False):
    """``model``'s first output for ``x`` (as input ``feed``) on ONNX Runtime's CPU provider, the rewrites
    ``disabled`` off, its optimized graph written to ``optimized``; ``extended_only``: no layout-level rewrites (the
    CPU provider's NCHWc pass would fuse Adds back into their convolutions)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if extended_only:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if disabled:
        opts.add_session_config_entry("optimization.disable_specified_optimizers", ";".join(disabled))
    if optimized:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {feed: x})[0]


def test_biases_become_adds_with_the_same_outputs_kept_apart_only_with_conv_add_fusion_off(tmp_path):
    import copy

    import onnx

    from audioldm2_trt.export.conv_bias import DISABLED_OPTIMIZERS, conv_bias_as_add

    before = _conv_graph()
    after = copy.deepcopy(before)
    assert conv_bias_as_add(after) == 2
    onnx.checker.check_model(after)
    ops = [n.op_type for n in after.graph.node]
    assert ops == ["Conv", "Add", "LeakyRelu", "Conv", "Add", "Conv", "Add"]
    inits = {i.name: list(i.dims) for i in after.graph.initializer}
    assert "b1" not in inits and "b2" not in inits and inits["b1_over_1d"] == [4, 1]
    x = np.random.default_rng(1).standard_normal((1, 3, 16)).astype(np.float32)
    ref = _run(before, x)
    np.testing.assert_allclose(_run(after, x, DISABLED_OPTIMIZERS), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run(after, x), ref, rtol=1e-5, atol=1e-6)
    kept, folded = tmp_path / "kept.onnx", tmp_path / "folded.onnx"
    _run(after, x, DISABLED_OPTIMIZERS, optimized=kept)
    _run(after, x, optimized=folded)
    count = lambda path: sum(n.op_type == "Add" for n in onnx.load(str(path)).graph.node)  # noqa: E731
    assert count(kept) == 3 and count(folded) == 1  # ONNX Runtime folds them back unless told not to
    assert conv_bias_as_add(after) == 0  # nothing left to move


def test_biases_behind_identity_nodes_and_transposed_convolutions_become_adds_too():
    """The TorchScript exporter writes equal initializers once and the others as an Identity of it (the random-weight
    full-size vocoder: 54 of its zero biases, which the first version of the rewrite skipped — run CR's profile kept
    59 cuDNN bias ops); a ``ConvTranspose`` (the vocoder's upsampling) has its bias added by the same cuDNN op."""
    import copy

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from audioldm2_trt.export.conv_bias import DISABLED_OPTIMIZERS, conv_bias_as_add

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             [("w1", (4, 3, 3)), ("w2", (4, 4, 3)), ("b", (4,)), ("wt", (4, 2, 4)), ("bt", (2,))]]
    nodes = [helper.make_node("Identity", ["b"], ["b_shared"]),
             helper.make_node("Conv", ["x", "w1", "b"], ["c1"], pads=[1, 1]),
             helper.make_node("LeakyRelu", ["c1"], ["r"], alpha=0.1),
             helper.make_node("Conv", ["r", "w2", "b_shared"], ["c2"], pads=[1, 1]),
             helper.make_node("ConvTranspose", ["c2", "wt", "bt"], ["y"], strides=[2], pads=[1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 32])], inits)
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    after = copy.deepcopy(before)
    assert conv_bias_as_add(after) == 3
    onnx.checker.check_model(after)
    assert [n.op_type for n in after.graph.node] == ["Conv", "Add", "LeakyRelu", "Conv", "Add", "ConvTranspose", "Add"]
    assert all(len(n.input) == 2 for n in after.graph.node if n.op_type in ("Conv", "ConvTranspose"))
    inits_after = {i.name: list(i.dims) for i in after.graph.initializer}
    assert inits_after["b_over_1d"] == [4, 1] and inits_after["bt_over_1d"] == [2, 1]
    assert "b" not in inits_after and "bt" not in inits_after
    assert [n.input[1] for n in after.graph.node if n.op_type == "Add"][:2] == ["b_over_1d", "b_over_1d"]
    x = rng.standard_normal((1, 3, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(after, x, DISABLED_OPTIMIZERS), _run(before, x), rtol=1e-5, atol=1e-6)


def _nhwc_conv_on_cpu(model):
    """``model`` with each com.microsoft ``NhwcConv`` (CUDA-only in ONNX Runtime) spelled in standard ops for the CPU
    provider: Transpose to NCHW, ``Conv`` with the weight [M, kH, kW, C] transposed to [M, C, kH, kW] (and the bias
    if it has one), Transpose back to NHWC."""
    import copy

    from onnx import helper, numpy_helper

    model = copy.deepcopy(model)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "NhwcConv":
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).transpose(0, 3, 1, 2)
        name = f"{node.input[1]}_nchw"
        model.graph.initializer.append(numpy_helper.from_array(weight.copy(), name))
        x, y = node.input[0], node.output[0]
        nodes += [helper.make_node("Transpose", [x], [f"{y}_in_nchw"], perm=[0, 3, 1, 2]),
                  helper.make_node("Conv", [f"{y}_in_nchw", name, *node.input[2:]], [f"{y}_nchw"],
                                   **{a.name: helper.get_attribute_value(a) for a in node.attribute}),
                  helper.make_node("Transpose", [f"{y}_nchw"], [y], perm=[0, 2, 3, 1])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_channels_last_convolutions_biases_become_adds_over_the_last_axis():
    """ONNX Runtime's ``NhwcConv`` (the fused VAE decoder's convolutions, [N, H, W, M] out) adds its bias with the
    same cuDNN op (run CS's profile: 28 of them in the VAE decoder, 15.3 µs each): its Add reads the bias [M] as it
    is, over the last axis — the same outputs, checked with the NhwcConv spelled in standard ops for the CPU."""
    import copy

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from audioldm2_trt.export.conv_bias import conv_bias_as_add

    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             [("w1", (4, 3, 3, 2)), ("b1", (4,)), ("w2", (3, 1, 1, 4)), ("b2", (3,))]]
    nodes = [helper.make_node("NhwcConv", ["x", "w1", "b1"], ["c1"], domain="com.microsoft", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("NhwcConv", ["r", "w2", "b2"], ["y"], domain="com.microsoft", kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 6, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 6, 3])], inits)
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("com.microsoft", 1)])
    after = copy.deepcopy(before)
    assert conv_bias_as_add(after) == 2
    assert [n.op_type for n in after.graph.node] == ["NhwcConv", "Add", "Relu", "NhwcConv", "Add"]
    assert all(len(n.input) == 2 for n in after.graph.node if n.op_type == "NhwcConv")
    inits_after = {i.name: list(i.dims) for i in after.graph.initializer}
    assert inits_after["b1_last_axis"] == [4] and inits_after["b2_last_axis"] == [3]
    assert "b1" not in inits_after and "b2" not in inits_after
    x = rng.standard_normal((1, 5, 6, 2)).astype(np.float32)
    ref = _run(_nhwc_conv_on_cpu(before), x)
    assert np.abs(ref).max() > 0.1
    onnx.checker.check_model(_nhwc_conv_on_cpu(after))
    np.testing.assert_allclose(_run(_nhwc_conv_on_cpu(after), x), ref, rtol=1e-5, atol=1e-6)


@needs_export
def test_tiny_vocoder_with_its_biases_as_adds_gives_the_same_waveform(tiny_artifacts, tmp_path):
    import onnx

    from audioldm2_trt.export.conv_bias import DISABLED_OPTIMIZERS, conv_bias_as_add

    before = onnx.load(str(tiny_artifacts / "vocoder.onnx"))
    convolutions = ("Conv", "ConvTranspose")
    with_bias = sum(n.op_type in convolutions and len(n.input) > 2 and bool(n.input[2]) for n in before.graph.node)
    after = onnx.load(str(tiny_artifacts / "vocoder.onnx"))
    assert with_bias > 3 and conv_bias_as_add(after) == with_bias
    assert not [n.name for n in after.graph.node if n.op_type in convolutions and len(n.input) > 2]

    mel = np.random.default_rng(2).standard_normal((1, 1, 32, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(after, mel, DISABLED_OPTIMIZERS, feed="mel"), _run(before, mel, feed="mel"),
                               rtol=1e-4, atol=1e-6)


class _WithVocoder:
    """A pipeline with another vocoder: ``pipe``'s attributes, ``vocoder`` in place of its own."""

    def __init__(self, pipe, vocoder):
        self._pipe, self.vocoder = pipe, vocoder

    def __getattr__(self, name):
        return getattr(self._pipe, name)


@needs_export
def test_full_size_vocoder_has_every_bias_moved_and_the_same_waveform(tiny_pipe, tmp_path):
    """The full-size vocoder (the bundled ``audioldm2`` config, its weights drawn as ``--random-weights audioldm2``
    draws them, equal biases shared through Identity nodes by the exporter as the random pipeline's zero biases are)
    exported with VOCODER_BIAS_ADD: no convolution keeps a bias (run CR's GPU profile found 59 of 97 left by the
    rewrite's first version), no Identity is left, and its waveform is the one of the export without the rewrite
    (ONNX Runtime's CPU provider, fp16 graphs)."""
    import onnx
    from onnx import numpy_helper
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    from audioldm2_trt.export.components import VOCODER_BIAS_ADD, pipeline_constants
    from audioldm2_trt.export.conv_bias import DISABLED_OPTIMIZERS
    from audioldm2_trt.export.onnx_export import export_component
    from audioldm2_trt.export.sources import _read_configs, _rescale_vocoder

    import torch

    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**_read_configs("audioldm2")["vocoder"])).eval()
    _rescale_vocoder(vocoder, seed=0)
    # non-zero biases, so that moving them shows in the waveform; one vector per width, so that the exporter still
    # shares equal ones through Identity nodes as it does the random pipeline's zero biases
    gen, per_width = torch.Generator().manual_seed(5), {}
    with torch.no_grad():
        for module in vocoder.modules():
            if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) and module.bias is not None:
                width = module.bias.shape[0]
                per_width.setdefault(width, 0.1 * torch.randn(width, generator=gen))
                module.bias.copy_(per_width[width])
    pipe = _WithVocoder(tiny_pipe, vocoder)
    consts = pipeline_constants(pipe)
    (tmp_path / "plain").mkdir()
    (tmp_path / "adds").mkdir()
    export_component(pipe, consts, "vocoder", tmp_path / "plain", "fp16")
    entry = export_component(pipe, consts, "vocoder", tmp_path / "adds", "fp16", recipe=VOCODER_BIAS_ADD)
    plain = onnx.load(str(tmp_path / "plain" / "vocoder.onnx"))
    adds = onnx.load(str(tmp_path / "adds" / "vocoder.onnx"))
    convolutions = ("Conv", "ConvTranspose")
    biased = [n for n in plain.graph.node if n.op_type in convolutions and len(n.input) > 2 and n.input[2]]
    assert len(biased) == 97 and any(n.op_type == "Identity" for n in plain.graph.node)
    assert entry["fp16"]["conv_biases_as_add"] == 97
    assert not [n.name for n in adds.graph.node if n.op_type in convolutions and len(n.input) > 2]
    assert not [n.name for n in adds.graph.node if n.op_type == "Identity"]

    mel = np.random.default_rng(4).standard_normal((1, 1, 16, consts["mel_bins"])).astype(np.float32)
    ref = _run(plain, mel, feed="mel", extended_only=True)
    got = _run(adds, mel, DISABLED_OPTIMIZERS, optimized=tmp_path / "optimized.onnx", feed="mel", extended_only=True)
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert not [n.name for n in optimized.graph.node if n.op_type in convolutions and len(n.input) > 2]
    moved = [numpy_helper.to_array(i) for i in adds.graph.initializer if i.name.endswith("_over_1d")]
    assert moved and all(np.abs(v).max() > 0.01 for v in moved)  # biases that change the waveform
    # the CPU provider runs these fp16 graphs in fp32 (its inserted Casts), the Add right after each convolution
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert np.isfinite(got).all() and err < 1e-5


@needs_export
def test_export_records_the_rewrites_to_keep_off_and_the_session_factory_passes_them(tiny_pipe, tmp_path):
    from audioldm2_trt.export.components import VOCODER_BIAS_ADD, pipeline_constants
    from audioldm2_trt.export.onnx_export import export_component
    from audioldm2_trt.runtime.backends.ort import DISABLE_OPTIMIZERS_KEY, OrtSessionFactory

    entry = export_component(tiny_pipe, pipeline_constants(tiny_pipe), "vocoder", tmp_path, "fp16",
                             recipe=VOCODER_BIAS_ADD)
    assert entry["disabled_optimizers"] == ["ConvAddFusion"] and entry["fp16"]["conv_biases_as_add"] > 3
    (tmp_path / "plain").mkdir()
    plain = export_component(tiny_pipe, pipeline_constants(tiny_pipe), "vocoder", tmp_path / "plain", "fp16")
    assert "disabled_optimizers" not in plain and "conv_biases_as_add" not in plain["fp16"]

    # the factory's session options, per component (an fp32 graph: the CPU provider runs it): the entry's rewrites
    # joined to those the caller's session_config disables, for that component only
    seen = []
    factory = OrtSessionFactory("cpu", precision="fp32", disabled_optimizers={"m": ("ConvAddFusion",)},
                                session_config={DISABLE_OPTIMIZERS_KEY: "NopElimination"})
    real = factory.ort.InferenceSession

    def spy(path, sess_options=None, providers=None):
        seen.append(sess_options.get_session_config_entry(DISABLE_OPTIMIZERS_KEY))
        return real(path, sess_options=sess_options, providers=providers)

    factory.ort = type("OrtSpy", (), {"InferenceSession": staticmethod(spy), "SessionOptions": factory.ort.SessionOptions,
                                      "GraphOptimizationLevel": factory.ort.GraphOptimizationLevel})()
    path = tmp_path / "m.onnx"
    path.write_bytes(_conv_graph().SerializeToString())
    factory.create("m", path)
    factory.create("other", path)
    assert seen == ["NopElimination;ConvAddFusion", "NopElimination"]


def test_manifest_entries_of_the_wrong_kind_are_artifact_errors(tmp_path):
    """disabled_optimizers (this module's) and length_multiple (CLAP_TEXT_MEA's) as the runtime reads them."""
    from audioldm2_trt.runtime.artifacts import Artifacts

    manifest = {"source": {"kind": "random", "config": "tiny"},
                "components": {"vocoder": {"disabled_optimizers": "ConvAddFusion"}, "unet": {}}}
    with pytest.raises(ArtifactError, match="vocoder's disabled_optimizers must be a list of rewrite names, got "
                                            "'ConvAddFusion'"):
        Artifacts(tmp_path, manifest).disabled_optimizers
    manifest["components"]["vocoder"]["disabled_optimizers"] = ["ConvAddFusion"]
    assert Artifacts(tmp_path, json.loads(json.dumps(manifest))).disabled_optimizers == {"vocoder": ("ConvAddFusion",)}
    assert Artifacts(tmp_path, manifest).length_multiple("unet") == 1
    for bad in ("8", 0, True, 2.0):
        manifest["components"]["unet"]["length_multiple"] = bad
        with pytest.raises(ArtifactError, match=f"unet's length_multiple must be an integer ≥ 1, got {bad!r}"):
            Artifacts(tmp_path, manifest).length_multiple("unet")
    manifest["components"]["unet"]["length_multiple"] = 8
    assert Artifacts(tmp_path, manifest).length_multiple("unet") == 8
