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


def clap_input_features(audios: np.ndarray, rate: int, features: ClapFeatures) -> np.ndarray:
    """float32 [R, samples] at ``rate`` → CLAP input_features float32 [R, 1, frames, mels]: each row resampled
    to CLAP's rate and turned into log-mel features, one thread per row. Each row's result is the same as alone.
    The threads buy little: on the H100 machine's 16 cores 4 rows of 10.24 s take 73 ms threaded against 78 ms one
    after another (docs/results/features-timing-2026-11-26.json); the host features are batch 4's ranking cost."""
    def one(row: np.ndarray) -> np.ndarray:
        return features(resample(row[None], rate, features.sampling_rate))[0]

    if len(audios) == 1:
        return one(audios[0])[None]
    with ThreadPoolExecutor(max_workers=min(len(audios), os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(one, audios)))


def rank_per_prompt(audios: np.ndarray, text_embeds: np.ndarray, n: int, rate: int,
                    features: ClapFeatures, clap_audio) -> tuple[np.ndarray, np.ndarray]:
    """audios float32 [P·n, samples] (prompt-major), text_embeds [P, D] (normalised).

    Returns (order [P·n] row indices, best first within each prompt; scores [P·n] cosine similarity).
    """
    feats = clap_input_features(audios, rate, features)
    audio_embeds = clap_audio.run({"input_features": feats})["audio_embeds"]
    scores = np.einsum("pnd,pd->pn", audio_embeds.reshape(len(text_embeds), n, -1), text_embeds)
    local = np.argsort(-scores, axis=1, kind="stable")
    order = (local + np.arange(len(text_embeds))[:, None] * n).reshape(-1)
    return order, np.take_along_axis(scores, local, axis=1).reshape(-1)
