"""The command line: generate writes 16-bit WAVs of the requested length; errors are one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from .conftest import needs_export

pytestmark = needs_export


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "audioldm2_trt.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_writes_pcm16_wav(tiny_artifacts, tmp_path):
    soundfile = pytest.importorskip("soundfile")
    out = tmp_path / "x.wav"
    r = _cli("generate", "a hammer hitting a wooden surface", "--artifacts", str(tiny_artifacts), "-o", str(out),
             "--steps", "4", "--seconds", "1.5", "--seed", "3", "--negative-prompt", "noise")
    assert r.returncode == 0, r.stderr
    info = soundfile.info(out)
    assert (info.samplerate, info.frames, info.subtype) == (16000, 24000, "PCM_16")
    assert "seed 3" in r.stdout
    data, _ = soundfile.read(out, dtype="int16")
    assert np.abs(data).max() > 0


def test_generate_several_waveforms(tiny_artifacts, tmp_path):
    r = _cli("generate", "thunder", "--artifacts", str(tiny_artifacts), "-o", str(tmp_path / "y.wav"),
             "--steps", "2", "--seconds", "0.5", "--waveforms", "2", "--scheduler", "ddim")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "y_0.wav").is_file() and (tmp_path / "y_1.wav").is_file()


def test_demo_uses_a_cached_export(tiny_artifacts, tmp_path):
    r = _cli("demo", "--cache", str(tiny_artifacts), "-o", str(tmp_path / "d.wav"), "--steps", "2", "--seconds", "1")
    assert r.returncode == 0, r.stderr
    assert "exporting" not in r.stderr and (tmp_path / "d.wav").is_file()


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], r"num_inference_steps=0 is outside [1, 998]"),
    (["--seconds", "999"], "audio_length_in_s=999.0 is outside the supported range"),
    (["--device", "cuda:7x"], "device 'cuda:7x' is not one of"),
    (["--backend", "trt"], "backend 'trt' runs on CUDA only; got device 'cpu'"),
])
def test_generate_bad_input_is_one_line(tiny_artifacts, tmp_path, args, message):
    r = _cli("generate", "thunder", "--artifacts", str(tiny_artifacts), "-o", str(tmp_path / "z.wav"), *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "z.wav").exists()


def test_generate_missing_artifacts(tmp_path):
    r = _cli("generate", "thunder", "--artifacts", str(tmp_path / "none"))
    assert r.returncode == 2 and "does not exist; build one with: audioldm2-trt export" in r.stderr


def test_generate_needs_no_native_audio_library(tiny_artifacts, tmp_path):
    """The WAV is written with the standard library: with soundfile unimportable (the GPU machine of run CD had none,
    and generate failed after the audio was made) the command still writes it, and libsndfile reads back the samples
    of the same request written where soundfile is importable."""
    soundfile = pytest.importorskip("soundfile")
    args = ["generate", "thunder", "--artifacts", str(tiny_artifacts), "--steps", "2", "--seconds", "0.5",
            "--seed", "1"]
    code = ("import sys; sys.modules['soundfile'] = None\n"
            "from audioldm2_trt.cli import main\n"
            f"sys.exit(main({args + ['-o', str(tmp_path / 'without.wav')]!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _cli(*args, "-o", str(tmp_path / "with.wav")).returncode == 0
    without, rate = soundfile.read(tmp_path / "without.wav", dtype="int16")
    with_, _ = soundfile.read(tmp_path / "with.wav", dtype="int16")
    assert rate == 16000 and soundfile.info(tmp_path / "without.wav").subtype == "PCM_16"
    assert len(without) == 8000 and np.abs(without).max() > 0
    np.testing.assert_array_equal(without, with_)
