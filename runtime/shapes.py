"""Seconds ↔ mel frames ↔ latent frames ↔ samples, exactly as diffusers' AudioLDM2Pipeline computes them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InvalidRequestError

# ONNX graphs have no fixed maximum length; beyond 4× the trained length (40.96 s for AudioLDM 2)
# the model is far out of distribution and memory grows linearly, so requests stop there.
MAX_LENGTH_FACTOR = 4


@dataclass(frozen=True)
class AudioShape:
    """One request's lengths: ``latent_frames`` F of latents [B, C, F, M], ``mel_frames`` F·vae_scale,
    ``samples`` the trimmed waveform length int(seconds · rate)."""

    seconds: float
    latent_frames: int
    mel_frames: int
    samples: int


def seconds_per_mel_frame(c: dict) -> float:
    return c["hop_length"] / c["sampling_rate"]


def default_seconds(c: dict) -> float:
    return c["unet_sample_size"] * c["vae_scale"] * seconds_per_mel_frame(c)


def length_range(c: dict) -> tuple[float, float]:
    """(shortest, longest) request in seconds: one latent frame … MAX_LENGTH_FACTOR × default."""
    return seconds_per_mel_frame(c) * c["vae_scale"], MAX_LENGTH_FACTOR * default_seconds(c)


def audio_shape(c: dict, seconds: float | None) -> AudioShape:
    """diffusers: height = int(s / hop_s), rounded up to a multiple of the VAE scale; trim to int(s · rate)."""
    if seconds is None:
        seconds = default_seconds(c)
    lo, hi = length_range(c)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        raise InvalidRequestError(f"audio_length_in_s must be a finite number, got {seconds!r}")
    if not lo <= seconds <= hi:
        raise InvalidRequestError(f"audio_length_in_s={seconds} is outside the supported range [{lo:g}, {hi:g}] s")
    height = int(seconds / seconds_per_mel_frame(c))
    scale = c["vae_scale"]
    if height % scale:
        height = int(math.ceil(height / scale)) * scale
    return AudioShape(float(seconds), height // scale, height, int(seconds * c["sampling_rate"]))


def t5_bucket(length: int) -> int:
    """The T5 length the UNet sees: padded up to a multiple of 16 (up to 64), then of 64, so that
    prompts of nearby lengths share one set of device buffers and one CUDA graph, and requests of
    different prompt lengths can share a batch. Padded positions carry mask 0, which the UNet's
    cross-attention turns into weight exactly 0."""
    step = 16 if length <= 64 else 64
    return -(-length // step) * step


def lm_buffer(length: int, new_tokens: int, max_positions: int) -> int:
    """The width of the step GPT-2 graph's buffer for a projected sequence of ``length`` positions that grows by
    ``new_tokens``: length + new_tokens rounded up to a multiple of 16, so that prompts of nearby lengths share
    one input shape (one set of device buffers, one CUDA graph) for all eight steps; never past GPT-2's
    ``max_positions`` (its position table)."""
    need = length + new_tokens
    return max(need, min(-(-need // 16) * 16, max_positions))


# The T5 buckets servers warm up before traffic: prompts of up to 32 T5 tokens (most sound descriptions).
WARM_T5_BUCKETS = (16, 32)


def batch_bucket(rows: int) -> int:
    """The rows a UNet / VAE decoder / vocoder run is padded to: the next power of two. A micro-batcher's
    batches of 1…N rows then use log2(N) + 1 input shapes — each with its own device buffers, cuDNN
    algorithm search and CUDA graph, which cost seconds the first time (measured on the H100: a shape met
    first under load stalled its batch) — instead of N. Padded rows repeat a real row and are dropped."""
    if rows < 1:
        raise ValueError(f"rows must be ≥ 1, got {rows}")
    return 1 << (rows - 1).bit_length()


def batch_buckets(max_rows: int) -> tuple[int, ...]:
    """Every bucket a batch of 1…max_rows rows can land in: what to warm up before traffic."""
    return tuple(1 << i for i in range(batch_bucket(max_rows).bit_length()))

