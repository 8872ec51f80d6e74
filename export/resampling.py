"""soxr's resampler as fixed polyphase filters, so that CLAP's input can be resampled inside an ONNX graph.

The runtime resamples the vocoder's waveforms (16 kHz) to CLAP's rate (48 kHz) before ranking them, as diffusers
does through ``librosa.resample`` (soxr, "HQ"). For an integer ratio R soxr is linear and time-invariant per input
sample: ``y[k] = Σ_n x[n] · h[k − R·n]`` for one impulse response ``h``, edges included (it pads with zeros). So
``h`` is read off soxr itself — the response to a unit impulse — and checked against soxr on a random signal before
it is used; the graph then computes soxr's output to float32 rounding (soxr's own float32 FFT noise is ~1e-7 of
full scale) without the host. A non-integer ratio, or a soxr whose output the response does not reproduce, is
refused here rather than approximated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime.errors import ExportError

QUALITY = "HQ"  # librosa.resample's default res_type "soxr_hq"
_PROBE_HALF = 4096  # input samples either side of the impulse: soxr HQ's response at 3× spans ±100 of them
_TAIL = 1e-7  # response taps below this (of a unit impulse) are soxr's float32 FFT noise, not filter


@dataclass(frozen=True)
class PolyphaseFilter:
    """``weight`` float32 [ratio, taps]: row p holds the taps of output phase p, ordered for a cross-correlation
    over the input padded by ``pad_left`` / ``pad_right`` zeros, so that
    ``out[:, p, q] = Σ_t weight[p, t] · padded[q + t]`` and ``y[ratio·q + p] = out[p, q]`` (``conv1d`` semantics)."""

    ratio: int
    weight: np.ndarray
    pad_left: int
    pad_right: int
    soxr_version: str

    def apply(self, audio: np.ndarray) -> np.ndarray:
        """float [B, N] → float64 [B, ratio·N], in numpy (the reference the graph is checked against)."""
        x = np.pad(np.asarray(audio, np.float64), ((0, 0), (self.pad_left, self.pad_right)))
        windows = np.lib.stride_tricks.sliding_window_view(x, self.weight.shape[1], axis=1)  # [B, N, taps]
        out = windows @ self.weight.astype(np.float64).T  # [B, N, ratio]
        return out.reshape(len(x), -1)


def soxr_polyphase(orig_sr: int, target_sr: int) -> PolyphaseFilter:
    """soxr's ``QUALITY`` resampler from ``orig_sr`` to ``target_sr`` (an integer multiple) as a PolyphaseFilter.

    Raises ExportError when the ratio is not an integer or the filter does not reproduce soxr on a probe signal
    (relative L2 above 1e-5)."""
    import soxr

    if target_sr % orig_sr:
        raise ExportError(f"resampling {orig_sr} → {target_sr} Hz: only integer upsampling ratios can run inside the "
                          f"CLAP features graph (this ratio is {target_sr / orig_sr:.4g})")
    ratio = target_sr // orig_sr
    impulse = np.zeros(2 * _PROBE_HALF, np.float32)
    impulse[_PROBE_HALF] = 1.0
    response = soxr.resample(impulse, orig_sr, target_sr, quality=QUALITY).astype(np.float64)
    centre = ratio * _PROBE_HALF
    support = np.nonzero(np.abs(response) > _TAIL)[0] - centre  # offsets d with h[d] != 0
    lo, hi = int(support.min()), int(support.max())
    if ratio * _PROBE_HALF - max(-lo, hi) < ratio * 64:
        raise ExportError(f"soxr's {orig_sr} → {target_sr} Hz response is longer than the probe measures")
    # y[R·q + p] = Σ_j x[q − j] · h[R·j + p]; j runs over j_min..j_max for some phase. As a cross-correlation
    # over x padded by j_max on the left: tap t reads x[q − j_max + t], i.e. j = j_max − t.
    j_min, j_max = -((ratio - 1 - lo) // ratio), hi // ratio  # ceil((lo − (R − 1)) / R), floor(hi / R)
    taps = j_max - j_min + 1
    weight = np.zeros((ratio, taps))
    for p in range(ratio):
        for t in range(taps):
            d = ratio * (j_max - t) + p
            if lo <= d <= hi:
                weight[p, t] = response[centre + d]
    filt = PolyphaseFilter(ratio, weight.astype(np.float32), pad_left=j_max, pad_right=-j_min,
                           soxr_version=getattr(soxr, "__version__", "unknown"))
    probe = 0.3 * np.random.default_rng(0).standard_normal((1, 3001)).astype(np.float32)
    want = soxr.resample(probe[0], orig_sr, target_sr, quality=QUALITY).astype(np.float64)
    got = filt.apply(probe)[0]
    err = np.linalg.norm(got - want) / np.linalg.norm(want) if len(got) == len(want) else np.inf
    if err > 1e-5:
        raise ExportError(f"soxr {filt.soxr_version}'s {orig_sr} → {target_sr} Hz resampler is not reproduced by its "
                          f"impulse response (rel-L2 {err:.2e}): it cannot run inside the CLAP features graph")
    return filt
