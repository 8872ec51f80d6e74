"""export/hoist_context.py: the UNet's text-only work cut into a context graph gives the same noise prediction, and the
runtime gives the same audio through it (ONNX Runtime's CPU provider, the tiny UNet; the fused full-size UNet's cut is
validated on the GPU: ``audioldm2-trt validate --device cuda``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from .conftest import needs_export

pytestmark = needs_export

onnx = pytest.importorskip("onnx")

CONTEXT_INPUTS = ("encoder_hidden_states", "encoder_hidden_states_1", "encoder_attention_mask_1")


def _feeds(tiny_artifacts, batch=2, seq=9, frames=16, seed=4) -> dict:
    from audioldm2_trt.export.components import BY_NAME, SampleShape, sample_inputs
    from audioldm2_trt.runtime.artifacts import load_artifacts

    consts = load_artifacts(tiny_artifacts).constants
    feeds = {k: v.numpy() for k, v in sample_inputs(BY_NAME["unet"], consts, SampleShape(batch, seq, frames),
                                                    seed=seed).items()}
    assert feeds["encoder_attention_mask_1"][1, -1] == 0  # the second row has T5 padding: the mask matters
    return feeds


def _session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(model, feeds) -> dict:
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})))


def _through_context(step, context, feeds) -> np.ndarray:
    return _run(step, {**feeds, **_run(context, feeds)})["noise_pred"]


def test_the_tiny_unet_cut_in_two_predicts_the_same_noise(tiny_artifacts):
    """The exported (unfused, fp32) tiny UNet: the cross-attention K/V projections depend on the text alone and move
    into the context graph; context → step equals the whole graph on two shapes."""
    from audioldm2_trt.export.hoist_context import split_context

    model = onnx.load(str(tiny_artifacts / "unet.onnx"))
    step, context, outputs = split_context(model, CONTEXT_INPUTS)

    cross_kv = {n.name for n in model.graph.node if n.op_type == "MatMul" and "/attn2/to_" in n.name
                and n.name.split("/attn2/to_")[1][:1] in "kv"}
    moved = {n.name for n in context.graph.node if n.op_type == "MatMul"}
    text_streams = sum(i.startswith("encoder_hidden_states") for i in CONTEXT_INPUTS)
    assert moved and moved <= cross_kv and len(moved) == len(cross_kv) * text_streams // 3  # 2 of 3 read text
    assert len(step.graph.node) + len([n for n in context.graph.node if n.op_type != "Constant"]) <= len(model.graph.node)
    assert [i.name for i in step.graph.input][:2] == ["sample", "timestep"]
    assert not set(CONTEXT_INPUTS) & {x for n in step.graph.node for x in n.input}  # the step reads no text input
    assert [o.name for o in context.graph.output] == outputs == [i.name for i in step.graph.input][2:]
    assert not {i.name for i in step.graph.initializer} & {i.name for i in context.graph.initializer
                                                          if i.name.startswith("unet.")}  # weights moved, not copied
    for batch, seq, frames, seed in ((2, 9, 16, 4), (3, 12, 24, 5)):
        feeds = _feeds(tiny_artifacts, batch, seq, frames, seed)
        np.testing.assert_array_equal(_through_context(step, context, feeds), _run(model, feeds)["noise_pred"])


def test_packed_cross_attention_kv_unpacked_and_cut_gives_the_same_noise(tiny_artifacts):
    """ONNX Runtime's attention fusion with packed K/V for cross-attention (as the fused recipe's): unpacked into
    separate K and V projections (the MultiHeadAttention then reads them as they are) it gives the unfused graph's
    output, mask included, and so it does cut into the context graph."""
    from .test_fp16 import _ATTENTION_ONLY, _fused_unet_on_cpu

    from audioldm2_trt.export.hoist_context import split_context, unpack_cross_kv
    from audioldm2_trt.export.validate import rel_l2

    feeds = _feeds(tiny_artifacts)
    reference = _run(onnx.load(str(tiny_artifacts / "unet.onnx")), feeds)["noise_pred"]
    options = tuple((k, v) for k, v in _ATTENTION_ONLY if k != "enable_packed_kv") + (("enable_packed_kv", True),)
    fused = _fused_unet_on_cpu(tiny_artifacts, "encoder_attention_mask_1", options)
    packed = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention" and len(n.input) > 1 and n.input[1]
              and not (len(n.input) > 2 and n.input[2])]
    assert packed  # the fusion packed some cross-attention K/V (which ONNX Runtime's CPU provider cannot run)

    assert unpack_cross_kv(fused) == len(packed)
    assert not [n for n in fused.graph.node if n.op_type == "MultiHeadAttention" and n.input[1]
                and not (len(n.input) > 2 and n.input[2])]  # every one reads separate K and V now
    assert rel_l2(_run(fused, feeds)["noise_pred"], reference) < 1e-5
    step, context, outputs = split_context(fused, CONTEXT_INPUTS)
    assert sum(n.op_type == "MatMul" for n in context.graph.node) >= 2 * len(packed)
    assert any(o.startswith("encoder_attention_mask_1_bias") for o in outputs)  # the mask's bias, once per request
    assert rel_l2(_through_context(step, context, feeds), reference) < 1e-5


def test_a_cut_that_cannot_be_made_is_refused(tiny_artifacts):
    from audioldm2_trt.export.hoist_context import HoistError, split_context

    model = onnx.load(str(tiny_artifacts / "unet.onnx"))
    with pytest.raises(HoistError, match=r"context inputs \['text'\] are not inputs of the graph"):
        split_context(model, ("text",))
    from onnx import TensorProto, helper

    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])  # noqa: E731
    add = helper.make_model(helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add",
                                              [value("a"), value("b")], [value("y")]))
    with pytest.raises(HoistError, match=r"no node of the graph depends on \['a'\] alone"):
        split_context(add, ("a",))


def _hoisted_copy(tiny_artifacts, folder):
    """A copy of the tiny fp32 artefacts whose UNet is cut as the fused recipe cuts it (``write_context``), with the
    manifest's entry as the export writes it."""
    from audioldm2_trt.export.onnx_export import _sha256, content_hash, save_model
    from audioldm2_trt.export.optimize import write_context

    shutil.copytree(tiny_artifacts, folder)
    path = folder / "unet.onnx"
    context = write_context(onnx.load(str(path)), path, CONTEXT_INPUTS, save_model)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["components"]["unet"]
    entry["sha256"] = _sha256(path)
    entry["context"] = {**context, "sha256": _sha256(folder / context["file"])}
    manifest["content_hash"] = content_hash(manifest["components"], manifest["tokenizers"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _bound_host_loop(folder):
    """A runtime whose sessions bind (as on CUDA) and whose loop runs on the host (no solver-step graph)."""
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.artifacts import load_artifacts
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    art = load_artifacts(folder)
    factory = OrtSessionFactory.for_artifacts(art, "cpu", bind=True)
    return AudioLDM2Runtime(art, factory.create_all(art.session_files(art.manifest["components"])), factory.device)


@pytest.mark.parametrize("loop", ["host", "bound host", "device"])
def test_the_runtime_gives_the_same_audio_through_the_context_graph(tiny_artifacts, tmp_path, loop):
    """The runtime runs the context graph once per loop and gives the audio of the uncut UNet, over two requests of
    other shapes and a batch of two prompts. Host loop: its outputs fed at every step; host loop over bound sessions
    (CUDA's way) and device loop: its outputs bound as the UNet's input buffers."""
    from audioldm2_trt.runtime import AudioLDM2Runtime

    folder = _hoisted_copy(tiny_artifacts, tmp_path / "hoisted")
    device_loop = loop == "device"
    whole = AudioLDM2Runtime.load(tiny_artifacts, device="cpu", device_loop=device_loop)
    cut = _bound_host_loop(folder) if loop == "bound host" else AudioLDM2Runtime.load(folder, device="cpu",
                                                                                       device_loop=device_loop)
    assert "unet_context" in cut.health()["components"] and "unet_context" not in whole.health()["components"]
    calls = [dict(prompt="rain on a roof", seed=1, num_inference_steps=3),
             dict(prompt="a dog barks twice in a large echoing hall", negative_prompt="noise", seed=2,
                  num_inference_steps=2, audio_length_in_s=2.0),
             dict(prompt=["wind", "a bell rings"], seed=3, num_inference_steps=2),
             dict(prompt="rain on a roof", seed=4, num_inference_steps=3)]  # the first shapes again: buffers reused
    context, runs = cut._unet_context, []
    for method in ("host_feeds", "device_feeds"):
        def counted(feeds, _run=getattr(context, method), _method=method, **options):
            runs.append(_method)
            return _run(feeds, **options)
        setattr(context, method, counted)
    for call in calls:
        np.testing.assert_allclose(cut(**call).audios, whole(**call).audios, rtol=0, atol=1e-6)
    assert runs == ["host_feeds" if loop == "host" else "device_feeds"] * len(calls)  # once per loop, not per step
    if loop == "bound host":
        assert cut._sessions["unet"].held().acquire(blocking=False)  # every loop let the UNet go
        cut._sessions["unet"].held().release()
    cut.close()
    whole.close()


def test_a_missing_context_graph_is_named(tiny_artifacts, tmp_path):
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.errors import ArtifactError

    folder = _hoisted_copy(tiny_artifacts, tmp_path / "hoisted")
    (folder / "unet_context.onnx").unlink()
    with pytest.raises(ArtifactError, match="is missing unet_context.onnx; rebuild with"):
        AudioLDM2Runtime.load(folder)


def test_sessions_without_the_context_graph_are_refused(tiny_artifacts, tmp_path):
    """A runtime built from sessions (cold_start.py's way) needs the context graph's session too: without it the UNet
    would be fed the text inputs its step graph no longer reads."""
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.artifacts import load_artifacts
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory
    from audioldm2_trt.runtime.errors import InvalidRequestError

    art = load_artifacts(_hoisted_copy(tiny_artifacts, tmp_path / "hoisted"))
    factory = OrtSessionFactory.for_artifacts(art, "cpu")
    sessions = factory.create_all({name: art.component_file(name) for name in art.manifest["components"]})
    with pytest.raises(InvalidRequestError, match="reads the outputs of its context graph \\(unet_context.onnx\\); "
                                                  "give its session as 'unet_context'"):
        AudioLDM2Runtime(art, sessions, factory.device)


def test_validate_runs_the_unet_through_its_context_graph(tiny_artifacts, tiny_pipe, tmp_path):
    """``audioldm2-trt validate`` on a folder whose UNet is cut: the context graph, then the step graph, against
    PyTorch's UNet, within the fp32 bar."""
    from audioldm2_trt.export.validate import FP32_TOLERANCE, validate

    checks = validate(_hoisted_copy(tiny_artifacts, tmp_path / "hoisted"), pipe=tiny_pipe, components=["unet"])
    assert [c.component for c in checks] == ["unet", "unet"]
    assert all(c.passed and c.rel_l2 < FP32_TOLERANCE for c in checks)


def test_past_max_graphs_the_context_graph_feeds_the_host_loop(tiny_artifacts, tmp_path):
    """With no shape key left (max_graphs=0) neither stepper gets device buffers: the loop runs on the host with the
    context graph's outputs as host arrays, gives the uncut UNet's audio and leaves the UNet free."""
    from audioldm2_trt.runtime import AudioLDM2Runtime

    folder = _hoisted_copy(tiny_artifacts, tmp_path / "hoisted")
    cut = AudioLDM2Runtime.load(folder, device="cpu", device_loop=True, max_graphs=0)
    whole = AudioLDM2Runtime.load(tiny_artifacts, device="cpu")
    call = dict(prompt="rain on a roof", seed=1, num_inference_steps=3)
    np.testing.assert_allclose(cut(**call).audios, whole(**call).audios, rtol=0, atol=1e-6)
    unet = cut._sessions["unet"]
    assert unet.held().acquire(blocking=False)
    unet.held().release()
    assert unet.stats.uncaptured_keys > 0 and not unet.stats.keys  # the host loop's runs, no buffers of its own
