"""Rank each prompt's waveforms by CLAP audio–text similarity.

diffusers ranks every waveform against every prompt and keeps the top ``n`` per prompt across the
whole batch, so with several prompts one prompt can receive another prompt's audio (diffusers PR
review #13602). Here each prompt's own ``n`` waveforms are ranked among themselves.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .audio import ClapFeatures, resample


def clap_input_features(audios: np.ndarray, rate: int, features: ClapFeatures, graph=None) -> np.ndarray:
    """float32 [R, samples] at ``rate`` (the vocoder's) → CLAP input_features float32 [R, 1, frames, mels].

    ``graph``: the artefacts' ``clap_features`` session, which resamples from the vocoder's rate it was exported for
    (``rate`` must be that rate: the runtime passes its own) to CLAP's with soxr's filter baked in at export, fits and
    computes the log-mel features itself — on the GPU, with no host work. Without it, on the host: each row
    resampled with soxr (as transformers' reference, through librosa, does) and its features computed in numpy, one
    thread per row. 4 rows of 10.24 s on the H100 machine: 2.2 ms through the graph (run V), 10.9 ms when the host
    resampled for the previous graph (run S), 69 ms all on the host (docs/benchmarks.md). On a 2-core CPU a features
    graph under ONNX Runtime's CPU provider is slower than numpy's FFT (69 vs 32 ms for 4 rows, features alone), so
    the runtime passes it on CUDA only (pipeline.py). Each row's result is the same as alone."""
    if graph is not None:
        return graph.run({"audio": np.ascontiguousarray(audios, dtype=np.float32)})["input_features"]

    def one(row: np.ndarray) -> np.ndarray:
        return features(resample(row[None], rate, features.sampling_rate))[0]

    if len(audios) == 1:
        return np.stack([one(audios[0])])
    with ThreadPoolExecutor(max_workers=min(len(audios), os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(one, audios)))


def rank_per_prompt(audios: np.ndarray, text_embeds: np.ndarray, n: int, rate: int,
                    features: ClapFeatures, clap_audio, clap_features=None) -> tuple[np.ndarray, np.ndarray]:
    """audios float32 [P·n, samples] (prompt-major), text_embeds [P, D] (normalised); clap_features: the
    features graph's session, or None for the host features (``clap_input_features``).

    Returns (order [P·n] row indices, best first within each prompt; scores [P·n] cosine similarity).
    """
    feats = clap_input_features(audios, rate, features, clap_features)
    audio_embeds = clap_audio.run({"input_features": feats})["audio_embeds"]
    scores = np.einsum("pnd,pd->pn", audio_embeds.reshape(len(text_embeds), n, -1), text_embeds)
    local = np.argsort(-scores, axis=1, kind="stable")
    order = (local + np.arange(len(text_embeds))[:, None] * n).reshape(-1)
    return order, np.take_along_axis(scores, local, axis=1).reshape(-1)
