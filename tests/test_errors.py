"""Bad input gets a clear error naming the value and the allowed range; nothing reaches a backend."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from audioldm2_trt.runtime import AudioLDM2Runtime
from audioldm2_trt.runtime.errors import ArtifactError, BackendError, InvalidRequestError

from .conftest import needs_export

pytestmark = needs_export


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "prompt is an empty list"),
    (dict(prompt=""), r"prompt\[0\] is empty"),
    (dict(prompt=["ok", "  "]), r"prompt\[1\] is empty"),
    (dict(prompt=42), "prompt must be a string or a list of strings, got int"),
    (dict(prompt=["ok", 3]), r"prompt\[1\] must be a string, got int 3"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt has 1 entries but prompt has 2"),
    (dict(prompt="a", num_inference_steps=0), r"num_inference_steps=0 is outside \[1, 998\]"),
    (dict(prompt="a", num_inference_steps=-3), r"num_inference_steps=-3 is outside \[1, 998\]"),
    (dict(prompt="a", num_inference_steps=2.5), "num_inference_steps must be an integer"),
    (dict(prompt="a", guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(prompt="a", audio_length_in_s=0), r"audio_length_in_s=0 is outside the supported range \[0.04, 20.48\] s"),
    (dict(prompt="a", audio_length_in_s=-1.0), "is outside the supported range"),
    (dict(prompt="a", audio_length_in_s=0.03), "audio_length_in_s=0.03 is outside"),
    (dict(prompt="a", audio_length_in_s=21.0), r"audio_length_in_s=21.0 is outside the supported range \[0.04, 20.48\]"),
    (dict(prompt="a", audio_length_in_s="5"), "audio_length_in_s must be a finite number, got '5'"),
    (dict(prompt="a", seed="7"), r"seed must be an integer in \[0, 9223372036854775807\], got '7'"),
    (dict(prompt="a", seed=-1), "seed=-1 is outside"),
    (dict(prompt="a", num_waveforms_per_prompt=0), r"num_waveforms_per_prompt=0 is outside \[1, 16\]"),
    (dict(prompt="a", scheduler="euler"), "scheduler 'euler' is not one of dpmsolver\\+\\+, ddim"),
    (dict(prompt="a", audio_length_in_s=2.5, latents=np.zeros((1, 8, 62, 16))),
     r"latents must be a float array of shape \(1, 8, 63, 16\), got float64 \(1, 8, 62, 16\)"),
    (dict(prompt="a", audio_length_in_s=2.5, latents=np.zeros((1, 8, 63, 16), dtype=np.int64)),
     "latents must be a float array"),
])
def test_bad_request(runtime, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        runtime(**kwargs)


def test_ddim_allows_one_more_step_than_dpm(runtime):
    with pytest.raises(InvalidRequestError, match=r"outside \[1, 999\]"):
        runtime("a", scheduler="ddim", num_inference_steps=1000)


def test_over_long_prompt_is_truncated_with_a_warning(runtime, caplog):
    long = "thunder rumbling " * 200
    with caplog.at_level(logging.WARNING, logger="audioldm2_trt.runtime"):
        out = runtime(long, num_inference_steps=1, audio_length_in_s=0.5, seed=0)
    assert out.audios.shape == (1, 8000)
    assert any("truncated to 77 tokens" in r.message for r in caplog.records)


def test_cuda_without_provider_is_an_error_not_a_cpu_run(tiny_artifacts):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendError, match=r"execution provider\(s\) \['CUDAExecutionProvider'\] not available"):
        AudioLDM2Runtime.load(tiny_artifacts, device="cuda")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:-1", 3])
def test_bad_device_string(tiny_artifacts, device):
    with pytest.raises(InvalidRequestError, match="device"):
        AudioLDM2Runtime.load(tiny_artifacts, device=device)


def test_device_parse_takes_a_device_as_it_is():
    from audioldm2_trt.runtime.backends.base import Device

    gpu = Device("cuda", 1)
    assert Device.parse(gpu) is gpu
    assert Device.parse(" CUDA:1 ") == gpu and Device.parse("cpu") == Device("cpu")


def _copy(src, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(src, dst)
    return dst


def test_missing_component_file(tiny_artifacts, tmp_path):
    art = _copy(tiny_artifacts, tmp_path)
    (art / "unet.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"is missing unet.onnx; rebuild with: audioldm2-trt export --random-weights tiny"):
        AudioLDM2Runtime.load(art)


def test_manifest_of_another_format_version(tiny_artifacts, tmp_path):
    art = _copy(tiny_artifacts, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["format_version"] = 1  # before clap_features took the vocoder's audio
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="exported with artefact format 1, this runtime reads formats 2, 3; rebuild "
                                            "with: audioldm2-trt export --random-weights tiny"):
        AudioLDM2Runtime.load(art)


def test_manifest_naming_an_unknown_gpt2_graph(tiny_artifacts, tmp_path):
    art = _copy(tiny_artifacts, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["components"]["gpt2"]["graph"] = "looped"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="gpt2 graph 'looped' is not one of step, unrolled; rebuild with"):
        AudioLDM2Runtime.load(art)


def test_folder_without_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        AudioLDM2Runtime.load(tmp_path / "x")
    with pytest.raises(ArtifactError, match="does not exist"):
        AudioLDM2Runtime.load(tmp_path / "nope")


def test_corrupt_onnx_file_names_the_component(tiny_artifacts, tmp_path):
    art = _copy(tiny_artifacts, tmp_path)
    (art / "vocoder.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(BackendError, match="could not load vocoder"):
        AudioLDM2Runtime.load(art)


def test_non_finite_stage_is_named(runtime, monkeypatch):
    from audioldm2_trt.runtime.errors import NonFiniteError

    unet = runtime._sessions["unet"]
    real = unet.run
    monkeypatch.setattr(unet, "run", lambda feeds: {"noise_pred": real(feeds)["noise_pred"] * np.nan})
    with pytest.raises(NonFiniteError, match=r"unet \(step 0\) produced non-finite values"):
        runtime("a", num_inference_steps=2, audio_length_in_s=0.5, seed=0)


def test_cuda_provider_options_tf32_only_for_fp16_artifacts():
    from audioldm2_trt.runtime.backends.base import Device
    from audioldm2_trt.runtime.backends.ort_options import cuda_provider_options

    opts = cuda_provider_options(Device.parse("cuda:1"), tf32=False)
    assert opts["device_id"] == 1 and opts["use_tf32"] == 0 and opts["cudnn_conv1d_pad_to_nc1d"] == 1
    assert cuda_provider_options(Device.parse("cuda"), tf32=True)["use_tf32"] == 1


def test_graph_refusal_is_recognised_from_onnxruntimes_message():
    from audioldm2_trt.runtime.backends.ort import _graph_selector, _is_graph_refusal

    # The message onnxruntime-gpu 1.31.1 gave on the H100 for clap_text (docs/results/benchmark-2026-11-26.json).
    seen = ("[ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph capture feature as requested by the "
            "user  as all compute graph nodes have not been partitioned to the CUDAExecutionProvider")
    assert _is_graph_refusal(RuntimeError(seen))
    assert not _is_graph_refusal(RuntimeError("[ONNXRuntimeError] : 3 : NO_SUCHFILE : Load model failed"))
    assert _graph_selector("auto")("unet") and _graph_selector(True)("vae_decoder")
    # "auto" leaves CLAP's text branch and the projection uncaptured (UNCAPTURED_BY_DEFAULT, run BP); True takes them
    assert not _graph_selector("auto")("clap_text") and not _graph_selector("auto")("projection")
    assert _graph_selector(True)("clap_text") and _graph_selector(("clap_text", "projection"))("projection")
    assert not _graph_selector(False)("unet") and not _graph_selector(["unet"])("gpt2")


def test_runtime_without_ranking_opens_no_clap_audio_and_refuses_several_waveforms(tiny_artifacts, runtime):
    """load(ranking=False) for servers that want one waveform per prompt: CLAP's audio branch and its features
    graph are not opened, one waveform comes out as with ranking, and more than one is an error naming the value."""
    rt = AudioLDM2Runtime.load(tiny_artifacts, ranking=False)
    kw = dict(num_inference_steps=2, audio_length_in_s=2.5, seed=3)
    np.testing.assert_allclose(rt("rain", **kw).audios, runtime("rain", **kw).audios, rtol=0, atol=1e-6)
    health = rt.health()
    assert health["ranking"] is False and runtime.health()["ranking"] is True
    assert not {"clap_audio", "clap_features"} & set(health["components"]) and "unet" in health["components"]
    with pytest.raises(InvalidRequestError, match=r"num_waveforms_per_prompt=2 needs CLAP ranking.*allowed value is 1"):
        rt("rain", num_waveforms_per_prompt=2, **kw)
    vocoder, batches = rt._sessions["vocoder"], []

    class Recorder:  # the vocoder, noting the batch of each mel it decodes
        def run(self, feeds):
            batches.append(len(feeds["mel"]))
            return vocoder.run(feeds)

    rt._sessions["vocoder"] = Recorder()
    rt.warmup(lengths_s=(2.5,), batch_sizes=(1, 2), steps=1)  # batch 2 as two prompts of one waveform each
    assert rt.health()["warm"] and batches == [1, 2]


def test_a_closed_runtime_refuses_calls_and_a_with_block_closes_it(tiny_artifacts, runtime):
    """close() releases the sessions: a later call, prepare or warm-up raises BackendError (not a KeyError from
    inside), health() reads not ok, and closing again is harmless. ``with`` closes on leaving, an error or not; a
    runtime used in the block gives the same audio as one never closed."""
    kw = dict(num_inference_steps=2, audio_length_in_s=1.0, seed=5)
    with AudioLDM2Runtime.load(tiny_artifacts) as rt:
        assert rt.health()["ok"]
        np.testing.assert_array_equal(rt("rain", **kw).audios, runtime("rain", **kw).audios)
    assert not rt.health()["ok"] and rt.health()["components"] == {}
    for call in (lambda: rt("rain", **kw), lambda: rt.prepare("rain", **kw), lambda: rt.warmup(steps=1)):
        with pytest.raises(BackendError, match="this runtime was closed; load the artefacts again"):
            call()
    rt.close()
    with pytest.raises(RuntimeError, match="inside"):
        with AudioLDM2Runtime.load(tiny_artifacts) as other:
            raise RuntimeError("inside")
    with pytest.raises(BackendError, match="was closed"):
        other("rain", **kw)


def test_a_closed_batcher_refuses_requests_and_leaves_the_runtime_open(runtime):
    from audioldm2_trt.runtime.batching import MicroBatcher

    kw = dict(num_inference_steps=2, audio_length_in_s=1.0, seed=5)
    with MicroBatcher(runtime, max_batch=2) as batcher:
        np.testing.assert_array_equal(batcher.generate("rain", timeout=120, **kw).audios, runtime("rain", **kw).audios)
    with pytest.raises(BackendError, match="the batcher is closed"):
        batcher.submit("rain", **kw)
    assert runtime.health()["ok"]
    batcher.close()  # again: harmless


def test_cublas_workspace_is_asked_for_unless_the_process_sets_it(monkeypatch, tiny_artifacts):
    """CUBLAS_WORKSPACE_CONFIG: set to one 256 KiB buffer per handle when absent, an operator's value kept, nothing
    touched on the CPU or with None, and a bad size named."""
    from audioldm2_trt.runtime.backends.ort_options import CUBLAS_WORKSPACE_KIB, limit_cublas_workspace

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    AudioLDM2Runtime.load(tiny_artifacts, device="cpu")  # no cuBLAS on the CPU: the environment is left alone
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert limit_cublas_workspace(None) is None
    assert limit_cublas_workspace(CUBLAS_WORKSPACE_KIB) == ":256:1"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert limit_cublas_workspace(4096) == ":16:8"
    for bad in (0, -1, 2.5, True, "4096"):
        with pytest.raises(BackendError, match=rf"cublas_workspace_kib must be a positive integer \(KiB\) or None, got {bad!r}"):
            limit_cublas_workspace(bad)
