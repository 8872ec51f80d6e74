"""A generation request, checked once at the boundary. Every message names the value and the range."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InvalidRequestError
from .schedulers import SCHEDULERS, max_steps
from .shapes import AudioShape, audio_shape

MAX_WAVEFORMS_PER_PROMPT = 16
MAX_PROMPTS = 64


@dataclass(frozen=True)
class Request:
    prompts: list[str]
    negative_prompts: list[str] | None  # None when guidance is off
    steps: int
    guidance_scale: float
    shape: AudioShape
    waveforms_per_prompt: int
    seed: int | None
    latents: np.ndarray | None
    scheduler: str

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.waveforms_per_prompt


def _prompt_list(value, name: str, allow_empty: bool) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise InvalidRequestError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    if not items:
        raise InvalidRequestError(f"{name} is an empty list; give at least one prompt")
    if len(items) > MAX_PROMPTS:
        raise InvalidRequestError(f"{name} has {len(items)} prompts; at most {MAX_PROMPTS} per call")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise InvalidRequestError(f"{name}[{i}] must be a string, got {type(p).__name__} {p!r}")
        if not allow_empty and not p.strip():
            raise InvalidRequestError(f"{name}[{i}] is empty; describe the sound to generate")
    return list(items)


def _int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidRequestError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= int(value) <= hi:
        raise InvalidRequestError(f"{name}={value} is outside [{lo}, {hi}]")
    return int(value)


def build_request(constants: dict, scheduler_config: dict, prompt, negative_prompt=None, num_inference_steps=20,
                  guidance_scale=3.5, audio_length_in_s=None, num_waveforms_per_prompt=1, seed=None,
                  latents=None, scheduler="dpmsolver++") -> Request:
    prompts = _prompt_list(prompt, "prompt", allow_empty=False)
    if scheduler not in SCHEDULERS:
        raise InvalidRequestError(f"scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    steps = _int(num_inference_steps, "num_inference_steps", 1, max_steps(scheduler, scheduler_config))
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise InvalidRequestError(f"guidance_scale must be a finite number (≤ 1 turns guidance off), got {guidance_scale!r}")
    waveforms = _int(num_waveforms_per_prompt, "num_waveforms_per_prompt", 1, MAX_WAVEFORMS_PER_PROMPT)
    negatives = None
    if guidance_scale > 1.0:
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _prompt_list(negative_prompt, "negative_prompt", allow_empty=True)
            if isinstance(negative_prompt, str):
                negatives = negatives * len(prompts)
            elif len(negatives) != len(prompts):
                raise InvalidRequestError(
                    f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; give one per prompt or a single string"
                )
    if seed is not None:
        _int(seed, "seed", 0, 2**63 - 1)
    shape = audio_shape(constants, audio_length_in_s)
    if latents is not None:
        expected = (len(prompts) * waveforms, constants["latent_channels"], shape.latent_frames, constants["latent_bins"])
        latents = np.asarray(latents)
        if latents.shape != expected or not np.issubdtype(latents.dtype, np.floating):
            raise InvalidRequestError(f"latents must be a float array of shape {expected}, got {latents.dtype} {latents.shape}")
        latents = latents.astype(np.float32)
    return Request(prompts, negatives, steps, float(guidance_scale), shape, waveforms,
                   None if seed is None else int(seed), latents, scheduler)
