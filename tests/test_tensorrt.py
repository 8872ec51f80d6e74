"""TensorRT: profiles, engine keys and platform checks without TensorRT; the build, the backend and
`validate --backend trt` where `import tensorrt` works and a GPU exists (skipped elsewhere, saying why)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("cuda") is not None
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="needs tensorrt and cuda-python with a CUDA GPU; neither can be "
                               "installed on this project's machines (README: TensorRT)")
PLATFORM = {"tensorrt": "10.13.0", "cuda": 13000, "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.fixture(scope="module")
def manifest(tiny_artifacts):
    return json.loads((tiny_artifacts / "manifest.json").read_text())


def test_profiles_cover_every_input_from_the_buckets(manifest):
    from audioldm2_trt.export.trt_build import BuildOptions, profiles
    from audioldm2_trt.runtime.shapes import audio_shape, lm_buffer, t5_bucket

    opts = BuildOptions(max_batch=3, lengths_s=(5.12, 2.0, 10.24), max_t5_tokens=70)
    prof = profiles(manifest, opts)
    c = manifest["constants"]
    frames = [audio_shape(c, s).latent_frames for s in opts.lengths_s]
    for name, entry in manifest["components"].items():
        assert set(prof[name]) == {t["name"] for t in entry["inputs"]}
        for lo, opt, hi in prof[name].values():
            assert all(a <= b <= d for a, b, d in zip(lo, opt, hi))
    unet = prof["unet"]
    assert unet["sample"] == [[1, 8, min(frames), 16], [2, 8, frames[0], 16], [6, 8, max(frames), 16]]  # CFG: 2 × 3
    assert unet["encoder_hidden_states_1"][2][1] == t5_bucket(70) == 128
    assert unet["encoder_hidden_states_1"][0][1] == 16  # the runtime never sends fewer than one bucket
    assert prof["vae_decoder"]["latents"][2][0] == 3  # no CFG after the UNet
    assert prof["vocoder"]["mel"][2][2] == max(frames) * c["vae_scale"]
    samples = [audio_shape(c, s).samples for s in opts.lengths_s]  # ranked rows are the trimmed waveforms
    assert prof["clap_features"]["audio"] == [[1, min(samples)], [2, samples[0]], [3, max(samples)]]
    assert prof["t5_encoder"]["input_ids"] == [[1, 1], [2, 16], [6, 70]]
    assert prof["unet"]["timestep"] == [[1], [1], [1]]
    # the step GPT-2 graph's buffer: t5 + 5 projected positions + 8 generated, rounded up to 16
    widths = [shape[1] for shape in prof["gpt2"]["inputs_embeds"]]
    assert widths == [lm_buffer(t + 5, 8, c["lm_max_positions"]) for t in (1, 16, 70)] == [16, 32, 96]
    assert prof["gpt2"]["last"] == [[1], [1], [1]]


def test_lm_sequence_is_t5_plus_five(tiny_artifacts, manifest):
    """The profile's lm_seq offset, checked on the exported projection itself."""
    from audioldm2_trt.export.trt_build import LM_EXTRA_TOKENS
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    session = OrtSessionFactory("cpu").create("projection", tiny_artifacts / "projection.onnx")
    c = manifest["constants"]
    for t5_len in (1, 7):
        out = session.run({"text_embeds": np.zeros((1, c["clap_dim"]), np.float32),
                           "t5_hidden_states": np.zeros((1, t5_len, c["t5_dim"]), np.float32),
                           "t5_attention_mask": np.ones((1, t5_len), np.int64)})
        assert out["inputs_embeds"].shape[1] == t5_len + LM_EXTRA_TOKENS


def test_engine_key_changes_with_everything_it_depends_on():
    from audioldm2_trt.export.trt_build import engine_key

    base = engine_key("abc", "fp16", {"x": [[1], [2], [3]]}, PLATFORM)
    assert base == engine_key("abc", "fp16", {"x": [[1], [2], [3]]}, dict(PLATFORM))
    variants = [engine_key("abd", "fp16", {"x": [[1], [2], [3]]}, PLATFORM),
                engine_key("abc", "fp32", {"x": [[1], [2], [3]]}, PLATFORM),
                engine_key("abc", "fp16", {"x": [[1], [2], [4]]}, PLATFORM)]
    variants += [engine_key("abc", "fp16", {"x": [[1], [2], [3]]}, {**PLATFORM, k: "other"}) for k in PLATFORM]
    assert len(set(variants + [base])) == len(variants) + 1


def test_platform_mismatch_names_the_difference_and_the_rebuild_command():
    from audioldm2_trt.export.trt_build import check_platform
    from audioldm2_trt.runtime.errors import ArtifactError

    entry = {**PLATFORM, "precision": "fp16"}
    check_platform(entry, PLATFORM, "engines/x")  # same machine: fine
    other = {**PLATFORM, "gpu": "NVIDIA A10G", "compute_capability": "8.6"}
    with pytest.raises(ArtifactError) as err:
        check_platform(entry, other, "engines/x")
    msg = str(err.value)
    assert "gpu 'NVIDIA H100 80GB HBM3' (this machine: 'NVIDIA A10G')" in msg
    assert "compute_capability '9.0' (this machine: '8.6')" in msg
    assert msg.endswith("rebuild with: audioldm2-trt build engines/x --precision fp16")
    with pytest.raises(ArtifactError, match="tensorrt '10.13.0' \\(this machine: '10.14.1'\\)"):
        check_platform(entry, {**PLATFORM, "tensorrt": "10.14.1"}, "engines/x")


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when tensorrt is missing")
def test_without_tensorrt_the_errors_say_how_to_install(tiny_artifacts, capsys):
    from audioldm2_trt.cli import main
    from audioldm2_trt.runtime import AudioLDM2Runtime, BackendError

    with pytest.raises(BackendError, match="needs the tensorrt Python package .* pip install tensorrt-cu12"):
        AudioLDM2Runtime.load(tiny_artifacts, device="cuda", backend="trt")
    assert main(["build", str(tiny_artifacts), "--precision", "fp32"]) == 2
    assert "needs the tensorrt Python package" in capsys.readouterr().err


def test_backend_selection_errors(tiny_artifacts):
    from audioldm2_trt.runtime import AudioLDM2Runtime, ArtifactError, InvalidRequestError

    with pytest.raises(InvalidRequestError, match="backend 'tensorrt' is not one of ort, ort-trt, trt"):
        AudioLDM2Runtime.load(tiny_artifacts, backend="tensorrt")
    with pytest.raises(InvalidRequestError, match="backend 'trt' runs on CUDA only; got device 'cpu'"):
        AudioLDM2Runtime.load(tiny_artifacts, device="cpu", backend="trt")
    from audioldm2_trt.export.trt_build import BuildOptions, build

    with pytest.raises(ArtifactError, match="holds fp32 artefacts; a fp16 build needs .*--precision fp16"):
        build(tiny_artifacts, BuildOptions(precision="fp16"))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_ort_tensorrt_provider_is_never_a_silent_cuda_run(tiny_artifacts):
    import onnxruntime

    from audioldm2_trt.runtime import AudioLDM2Runtime, BackendError

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider; the GPU tests cover it")
    with pytest.raises(BackendError, match="TensorrtExecutionProvider.*not available"):
        AudioLDM2Runtime.load(tiny_artifacts, device="cuda", backend="ort-trt")


# -- with TensorRT and a GPU --------------------------------------------------------------------------
@needs_trt
def test_build_is_resumable_and_engines_match_onnx_runtime(tiny_artifacts, tmp_path):
    import shutil

    from audioldm2_trt.export.trt_build import BuildOptions, build
    from audioldm2_trt.export.validate import validate_trt

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    logs = []
    build(art, BuildOptions(precision="fp32", max_batch=2, lengths_s=(2.0, 5.12)), log=logs.append)
    assert sum("built" in line for line in logs) == 8
    logs.clear()
    build(art, BuildOptions(precision="fp32", max_batch=2, lengths_s=(2.0, 5.12)), log=logs.append)
    assert sum("up to date" in line for line in logs) == 8
    checks = validate_trt(art, device="cuda")
    assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed]


@needs_trt
def test_trt_runtime_matches_ort_runtime(tiny_artifacts, tmp_path):
    import shutil

    from audioldm2_trt.export.trt_build import BuildOptions, build
    from audioldm2_trt.runtime import AudioLDM2Runtime

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    build(art, BuildOptions(precision="fp32", max_batch=2, lengths_s=(2.0,)))
    kwargs = dict(seed=3, num_inference_steps=5, audio_length_in_s=2.0)
    a = AudioLDM2Runtime.load(art, device="cuda", backend="trt")("a dog barks", **kwargs).audios
    b = AudioLDM2Runtime.load(art, device="cuda")("a dog barks", **kwargs).audios
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-3
    with pytest.raises(Exception, match="outside the engine's profile"):
        AudioLDM2Runtime.load(art, device="cuda", backend="trt")("a dog", seed=0, audio_length_in_s=5.12)


def test_build_refuses_onnx_runtime_fused_artefacts(tiny_artifacts, tmp_path):
    """The default fp16 export fuses the UNet/VAE into ONNX Runtime contrib ops, which TensorRT cannot parse:
    the build says so (and which export to run) before it needs TensorRT."""
    import json
    import shutil

    from audioldm2_trt.export.trt_build import BuildOptions, build
    from audioldm2_trt.runtime import ArtifactError

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    m = json.loads((art / "manifest.json").read_text())
    m["precision"] = "fp16"
    m["components"]["unet"]["fp16"] = {"fused": {"MultiHeadAttention": 14, "GroupNorm": 9}}
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"'unet': \['GroupNorm', 'MultiHeadAttention'\].*--fuse none"):
        build(art, BuildOptions(precision="fp16"))
