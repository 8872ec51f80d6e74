"""Audio helpers without torch: trimming, 16-bit WAV, resampling, and CLAP's log-mel features.

The CLAP features re-implement transformers' ``ClapFeatureExtractor`` (``rand_trunc`` truncation, the
mode of AudioLDM 2's unfused CLAP) in numpy; ``tests/test_audio.py`` checks them against it.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ArtifactError


def to_pcm16(waveform: np.ndarray) -> np.ndarray:
    """float [-1, 1] → int16: clip first, then scale (no wrap-around on loud samples)."""
    return np.round(np.clip(waveform, -1.0, 1.0) * 32767.0).astype(np.int16)


def wav_bytes(pcm16: np.ndarray, sample_rate: int) -> bytes:
    """int16 [samples] → the bytes of a mono 16-bit PCM WAV file (the standard library's ``wave``: no native
    dependency)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes(np.asarray(pcm16, dtype="<i2").reshape(-1).tobytes())
    return buf.getvalue()


def write_wav(path, waveform: np.ndarray, sample_rate: int) -> None:
    """Write one mono waveform (float32 [samples]) as 16-bit PCM WAV."""
    Path(path).write_bytes(wav_bytes(to_pcm16(np.asarray(waveform).reshape(-1)), sample_rate))


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """[B, N] → [B, ceil(N · target/orig)] with soxr's HQ filter, as ``librosa.resample`` does by default."""
    import soxr

    n_out = int(np.ceil(audio.shape[-1] * target_sr / orig_sr))
    rows = []
    for row in np.asarray(audio, dtype=np.float32):
        y = soxr.resample(row, orig_sr, target_sr, quality="HQ")
        rows.append(np.pad(y, (0, max(0, n_out - len(y))))[:n_out])
    return np.stack(rows)


def _hz_to_mel(freq, scale):
    freq = np.asarray(freq, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + freq / 700.0)
    logstep = 27.0 / np.log(6.4)
    mels = 3.0 * freq / 200.0
    return np.where(freq >= 1000.0, 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * logstep, mels)


def _mel_to_hz(mels, scale):
    mels = np.asarray(mels, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (np.power(10.0, mels / 2595.0) - 1.0)
    logstep = np.log(6.4) / 27.0
    freq = 200.0 * mels / 3.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(logstep * (mels - 15.0)), freq)


def mel_filter_bank(n_freqs: int, n_mels: int, f_min: float, f_max: float, sr: int, slaney: bool) -> np.ndarray:
    """Triangular filters [n_freqs, n_mels]; ``slaney``: slaney scale + area norm, else HTK unnormalised."""
    scale = "slaney" if slaney else "htk"
    filter_freqs = _mel_to_hz(np.linspace(_hz_to_mel(f_min, scale), _hz_to_mel(f_max, scale), n_mels + 2), scale)
    fft_freqs = np.linspace(0, sr // 2, n_freqs)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    if slaney:
        filters = filters.astype(np.float32) * (2.0 / (filter_freqs[2:] - filter_freqs[:-2]))[None, :]
    return filters


# transformers' ClapFeatureExtractor paddings of a row shorter than CLAP's window (``ClapFeatures._fit``; the export's
# features graph fits rows the same way)
CLAP_PADDINGS = ("repeatpad", "repeat", "pad")


@dataclass(frozen=True)
class ClapFeatures:
    """CLAP's log-mel front end, configured from the artefact manifest's ``feature_extractor``."""

    sampling_rate: int
    hop_length: int
    fft_window_size: int
    max_samples: int
    padding: str
    mel_filters: np.ndarray  # [fft/2+1, n_mels]

    @classmethod
    def from_config(cls, cfg: dict) -> "ClapFeatures":
        if cfg["truncation"] != "rand_trunc":
            raise ArtifactError(
                f"CLAP feature extractor truncation {cfg['truncation']!r} is not supported by this runtime "
                "(supported: 'rand_trunc', the unfused CLAP of AudioLDM 2)"
            )
        if cfg["padding"] not in CLAP_PADDINGS:
            raise ArtifactError(f"CLAP feature extractor padding {cfg['padding']!r} is not one of "
                                f"{', '.join(CLAP_PADDINGS)}")
        filters = mel_filter_bank(cfg["fft_window_size"] // 2 + 1, cfg["feature_size"], cfg["frequency_min"],
                                  cfg["frequency_max"], cfg["sampling_rate"], slaney=True)
        return cls(cfg["sampling_rate"], cfg["hop_length"], cfg["fft_window_size"],
                   int(cfg["max_length_s"] * cfg["sampling_rate"]), cfg["padding"], filters)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """[B, N] waveforms at ``sampling_rate`` → input_features float32 [B, 1, frames, n_mels], computed in float64
        on the host.

        Waveforms longer than ``max_length_s`` are cut to their first ``max_length_s`` seconds
        (transformers picks a random offset from numpy's global RNG; a server must be deterministic).
        """
        return np.stack([self._log_mel(self._padded(np.asarray(w, np.float64)))[None] for w in audio])

    def _padded(self, w: np.ndarray) -> np.ndarray:
        half = self.fft_window_size // 2
        return np.pad(self._fit(w), (half, half), mode="reflect")

    def _fit(self, w: np.ndarray) -> np.ndarray:
        n = self.max_samples
        if len(w) >= n:
            return w[:n]
        if self.padding == "repeat":
            w = np.tile(w, n // len(w) + 1)[:n]
        elif self.padding == "repeatpad":
            w = np.tile(w, n // len(w))
        return np.pad(w, (0, n - len(w)))

    def _log_mel(self, w: np.ndarray) -> np.ndarray:
        """float64 [max_samples + n_fft] (``_padded``) → float32 [frames, n_mels]."""
        n_fft, hop = self.fft_window_size, self.hop_length
        n_frames = 1 + (len(w) - n_fft) // hop
        window = np.hanning(n_fft + 1)[:-1]
        frames = np.lib.stride_tricks.sliding_window_view(w, n_fft)[::hop][:n_frames] * window
        power = np.abs(np.fft.rfft(frames, n=n_fft, axis=-1)) ** 2  # [frames, n_fft/2+1]
        mel = np.maximum(1e-10, power @ self.mel_filters)
        return (10.0 * np.log10(mel)).astype(np.float32)
