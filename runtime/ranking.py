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
    """float32 [R, samples] at ``rate`` → CLAP input_features float32 [R, 1, frames, mels].

    Each row is resampled to CLAP's rate on the host (soxr, as transformers' reference does), one thread per row.
    ``graph``: the artefacts' ``clap_features`` session — the log-mel features are then computed by it (on the GPU)
    from the fitted, padded rows (``ClapFeatures.prepare``); without it, in numpy on the host. On the H100 machine's
    CPU the numpy features of 4 rows of 10.24 s take 73 ms threaded, 78 ms one after another
    (docs/results/features-timing-2026-11-26.json): batch 4's ranking cost before the graph; through the graph
    11.2 ms, of which the graph is 2.0 ms and the rest the resampling (run H, features-timing-gpu-2026-11-26.json),
    and batch 4 went from 2.17 to 1.93 × batch 1 (docs/benchmarks.md). On a 2-core CPU the
    graph under ONNX Runtime's CPU provider is slower than numpy's FFT (69 vs 32 ms for 4 rows), so the runtime
    passes it on CUDA only (pipeline.py). Each row's result is the same as alone."""
    def one(row: np.ndarray) -> np.ndarray:
        at_clap_rate = resample(row[None], rate, features.sampling_rate)
        return features.prepare(at_clap_rate)[0] if graph is not None else features(at_clap_rate)[0]

    if len(audios) == 1:
        rows = [one(audios[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(len(audios), os.cpu_count() or 1)) as pool:
            rows = list(pool.map(one, audios))
    stacked = np.stack(rows)
    return graph.run({"waveform": stacked})["input_features"] if graph is not None else stacked


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
