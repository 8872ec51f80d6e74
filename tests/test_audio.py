"""Audio helpers: CLAP features and resampling against transformers / librosa, PCM16 conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from audioldm2_trt.runtime.audio import ClapFeatures, resample, to_pcm16, write_wav


def _config(name):
    from audioldm2_trt.export.sources import CONFIG_ROOT

    return json.loads((CONFIG_ROOT / name / "feature_extractor.json").read_text())


@pytest.mark.parametrize("config", ["audioldm2", "tiny"])
@pytest.mark.parametrize("seconds", [2.5, 7.0, 10.0])
def test_clap_features_match_transformers(config, seconds):
    transformers = pytest.importorskip("transformers")
    cfg = _config(config)
    ref_fe = transformers.ClapFeatureExtractor(**cfg)
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal((2, int(seconds * cfg["sampling_rate"])))).astype(np.float32)
    ref = ref_fe(list(audio), sampling_rate=cfg["sampling_rate"], return_tensors="np").input_features
    got = ClapFeatures.from_config(cfg)(audio)
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)  # dB values, float32 rounding


def test_long_audio_is_cut_deterministically():
    cfg = _config("tiny")
    fe = ClapFeatures.from_config(cfg)
    audio = np.random.default_rng(1).standard_normal((1, int(12 * cfg["sampling_rate"]))).astype(np.float32)
    np.testing.assert_array_equal(fe(audio), fe(audio[:, : fe.max_samples]))


def test_unsupported_truncation_is_refused():
    from audioldm2_trt.runtime.errors import ArtifactError

    with pytest.raises(ArtifactError, match="truncation 'fusion' is not supported"):
        ClapFeatures.from_config({**_config("tiny"), "truncation": "fusion"})


def test_resample_matches_librosa():
    librosa = pytest.importorskip("librosa")
    audio = np.random.default_rng(2).standard_normal((2, 16000 * 2 + 37)).astype(np.float32)
    ref = librosa.resample(audio, orig_sr=16000, target_sr=48000)
    got = resample(audio, 16000, 48000)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_pcm16_clips_before_scaling(tmp_path):
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(to_pcm16(x), [-32767, -32767, -16384, 0, 16384, 32767, 32767])
    soundfile = pytest.importorskip("soundfile")
    write_wav(tmp_path / "a.wav", x, 16000)
    data, rate = soundfile.read(tmp_path / "a.wav", dtype="int16")
    assert rate == 16000 and soundfile.info(tmp_path / "a.wav").subtype == "PCM_16"
    np.testing.assert_array_equal(data, to_pcm16(x))
    noise = np.random.default_rng(0).uniform(-1.2, 1.2, 24001).astype(np.float32)  # odd length, clipped samples
    write_wav(tmp_path / "b.wav", noise, 22050)
    data, rate = soundfile.read(tmp_path / "b.wav", dtype="int16")
    assert rate == 22050 and soundfile.info(tmp_path / "b.wav").channels == 1
    np.testing.assert_array_equal(data, to_pcm16(noise))


def test_ranking_features_in_threads_equal_the_serial_computation():
    """clap_input_features runs rows in parallel threads; each row must be exactly what it is alone (16 kHz
    waveforms of different content and lengths padded the same, resampled to 48 kHz, then log-mel)."""
    from audioldm2_trt.runtime.ranking import clap_input_features

    fe = ClapFeatures.from_config(_config("audioldm2"))
    rng = np.random.default_rng(3)
    audios = (0.2 * rng.standard_normal((5, 16000 * 3))).astype(np.float32)
    audios[2] *= 0.01  # a quiet row among loud ones
    serial = fe(resample(audios, 16000, fe.sampling_rate))
    threaded = clap_input_features(audios, 16000, fe)
    assert threaded.shape == serial.shape == (5, 1, 1001, 64)
    assert np.array_equal(threaded, serial)
    assert np.array_equal(clap_input_features(audios[1:2], 16000, fe), serial[1:2])


@pytest.mark.parametrize("samples", [1, 37, 3001, 163840])
def test_soxr_polyphase_filter_reproduces_soxr(samples):
    """The features graph's resampler: soxr's impulse response as 3 polyphase filters gives soxr's own output,
    edges included, to float32 rounding (soxr computes in float32)."""
    import soxr

    from audioldm2_trt.export.resampling import soxr_polyphase

    filt = soxr_polyphase(16000, 48000)
    assert filt.ratio == 3 and filt.weight.shape[0] == 3
    audio = (0.3 * np.random.default_rng(samples).standard_normal((2, samples))).astype(np.float32)
    got = filt.apply(audio)
    for row, g in zip(audio, got):
        want = soxr.resample(row, 16000, 48000, quality="HQ")
        assert g.shape == want.shape
        assert np.abs(g - want).max() <= 1e-6 * max(1.0, np.abs(want).max())


def test_soxr_polyphase_refuses_a_fractional_ratio():
    from audioldm2_trt.export.resampling import soxr_polyphase
    from audioldm2_trt.runtime.errors import ExportError

    with pytest.raises(ExportError, match=r"22050 → 48000 Hz: only integer upsampling ratios .* \(this ratio is 2\.177\)"):
        soxr_polyphase(22050, 48000)
