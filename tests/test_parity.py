"""End to end: the runtime and diffusers' AudioLDM2Pipeline on the same latents, tiny random weights."""

from __future__ import annotations

import numpy as np
import pytest

from audioldm2_trt.runtime.shapes import audio_shape

from .conftest import needs_export

pytestmark = needs_export
TOLERANCE = 1e-3


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _diffusers(pipe, scheduler, **kw):
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = DPMSolverMultistepScheduler if scheduler == "dpmsolver++" else DDIMScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    kw["latents"] = torch.from_numpy(kw["latents"])
    return pipe(**kw).audios


CASES = {
    "one prompt": dict(prompt="a hammer hitting a wooden surface", audio_length_in_s=2.5),
    "negative prompt": dict(prompt="birds chirping in a forest", negative_prompt="low quality, noisy",
                            audio_length_in_s=2.5),
    "guidance 1.0": dict(prompt="a dog barking", guidance_scale=1.0, audio_length_in_s=5.12),
    "two prompts of different lengths": dict(
        prompt=["thunder", "an orchestra playing a slow sad melody with violins and a piano"],
        negative_prompt=["noisy", "low quality, distorted audio"], audio_length_in_s=5.12),
}


@pytest.mark.parametrize("scheduler, steps", [("dpmsolver++", 20), ("ddim", 50)])
@pytest.mark.parametrize("case", list(CASES))
def test_waveform_matches_diffusers(tiny_pipe, runtime, scheduler, steps, case):
    kw = dict(CASES[case], num_inference_steps=steps)
    n = len(kw["prompt"]) if isinstance(kw["prompt"], list) else 1
    shape = audio_shape(runtime.constants, kw["audio_length_in_s"])
    kw["latents"] = np.random.default_rng(7).standard_normal((n, 8, shape.latent_frames, 16)).astype(np.float32)
    ref = _diffusers(tiny_pipe, scheduler, **kw)
    out = runtime(**kw, scheduler=scheduler)
    assert out.audios.shape == ref.shape == (n, int(kw["audio_length_in_s"] * 16000))
    assert out.audios.dtype == np.float32 and out.sample_rate == 16000
    assert np.abs(ref).max() > 1e-4  # the reference is not silent, so the comparison means something
    assert _rel(out.audios, ref) <= TOLERANCE


def test_two_waveforms_are_ranked_like_diffusers(tiny_pipe, runtime):
    pytest.importorskip("librosa", reason="diffusers ranks waveforms only when librosa is installed")
    kw = dict(prompt="birds chirping in a forest", audio_length_in_s=2.5, num_inference_steps=20)
    lat = np.random.default_rng(11).standard_normal((2, 8, 63, 16)).astype(np.float32)
    unranked = runtime(**{**kw, "prompt": [kw["prompt"]] * 2}, latents=lat).audios
    ref = _diffusers(tiny_pipe, "dpmsolver++", **kw, latents=lat, num_waveforms_per_prompt=2)
    out = runtime(**kw, latents=lat, num_waveforms_per_prompt=2)
    assert out.scores is not None and out.scores[0] >= out.scores[1]
    order = [int(np.argmin([_rel(o, u) for u in unranked])) for o in out.audios]
    assert sorted(order) == [0, 1]  # a permutation of the generated rows …
    assert _rel(out.audios, ref) <= TOLERANCE  # … in diffusers' order


def test_ranking_is_per_prompt(runtime):
    """Each prompt gets back its own waveforms, best first (diffusers would rank across prompts)."""
    prompts = ["thunder rumbling", "a man speaking"]
    lat = np.random.default_rng(5).standard_normal((4, 8, 63, 16), dtype=np.float32)
    kw = dict(audio_length_in_s=2.5, num_inference_steps=3)
    ranked = runtime(prompts, num_waveforms_per_prompt=2, latents=lat, **kw)
    unranked = runtime([prompts[0], prompts[0], prompts[1], prompts[1]], latents=lat, **kw).audios
    assert ranked.audios.shape == (4, 40000)
    owners = [int(np.argmin([_rel(r, u) for u in unranked])) // 2 for r in ranked.audios]
    assert owners == [0, 0, 1, 1]
    assert ranked.scores[0] >= ranked.scores[1] and ranked.scores[2] >= ranked.scores[3]


def test_seed_reproduces_and_is_reported(runtime):
    a = runtime("thunder", seed=123, num_inference_steps=3, audio_length_in_s=2.5)
    b = runtime("thunder", seed=123, num_inference_steps=3, audio_length_in_s=2.5)
    c = runtime("thunder", num_inference_steps=3, audio_length_in_s=2.5)
    assert a.seed == 123 and np.array_equal(a.audios, b.audios)
    assert isinstance(c.seed, int)
    d = runtime("thunder", seed=c.seed, num_inference_steps=3, audio_length_in_s=2.5)
    assert np.array_equal(c.audios, d.audios)
