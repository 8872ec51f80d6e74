"""``AudioLDM2Runtime``: prompt → embeddings → latents → mel → waveform, over exported components.

Shared state (sessions, tokenizers, constants) is read-only after ``load``; everything a request
needs (RNG, scheduler state, buffers) lives in the call, so one runtime serves many threads.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .artifacts import Artifacts, load_artifacts
from .audio import ClapFeatures
from .backends.base import Device
from .backends.ort import DEFAULT_MAX_GRAPHS, OrtSessionFactory
from .errors import BackendError
from .conditioning import Conditioning, check_finite, encode_text
from .ranking import rank_per_prompt
from .requests import Request, build_request
from .shapes import t5_bucket
from .schedulers import SolverState, make_plan
from .tokenization import TextTokenizer, tokenize_prompts

log = logging.getLogger("audioldm2_trt.runtime")

StepCallback = Callable[[int, int], None]  # (step index, number of steps)


@dataclass(frozen=True)
class AudioOutput:
    """audios float32 [prompts × waveforms, samples], prompt-major, each prompt's best first;
    ``seed`` the seed of numpy's PCG64 generator that drew the initial latents (None if given)."""

    audios: np.ndarray
    sample_rate: int
    seed: int | None
    scores: np.ndarray | None = None  # CLAP cosine similarity per row when ranked


class AudioLDM2Runtime:
    def __init__(self, artifacts: Artifacts, sessions: dict, device: Device):
        self.artifacts = artifacts
        self.constants = artifacts.constants
        self.device = device
        self.sample_rate = self.constants["sampling_rate"]
        self._sessions = sessions
        toks = artifacts.manifest["tokenizers"]
        self._clap_tok = TextTokenizer(artifacts.tokenizer_file("clap"), toks["clap"]["model_max_length"],
                                       toks["clap"]["pad_token_id"], "CLAP")
        self._t5_tok = TextTokenizer(artifacts.tokenizer_file("t5"), toks["t5"]["model_max_length"],
                                     toks["t5"]["pad_token_id"], "T5")
        self._clap_features = ClapFeatures.from_config(artifacts.manifest["feature_extractor"])
        self._scheduler_config = artifacts.manifest["scheduler"]
        self._warm = False

    @classmethod
    def load(cls, folder, device: str = "cpu", providers: list | None = None, threads: int = 0,
             cuda_graphs=True, max_graphs: int = DEFAULT_MAX_GRAPHS) -> "AudioLDM2Runtime":
        """Open an artefact folder written by ``audioldm2-trt export``.

        device: "cpu", "cuda" or "cuda:N" (never a silent fallback); providers: ONNX Runtime
        execution providers to use instead of the device's default; threads: intra-op threads (0 = ORT default).
        cuda_graphs (CUDA only): capture one CUDA graph per component and input shape — True, False, or
        the component names to capture; max_graphs: shapes captured per component (later ones run uncaptured).
        """
        art = load_artifacts(folder)
        factory = OrtSessionFactory(device, providers, threads, cuda_graphs=cuda_graphs, max_graphs=max_graphs)
        art.check_device(factory.device.kind)
        sessions = factory.create_all({name: art.component_file(name) for name in art.manifest["components"]})
        return cls(art, sessions, factory.device)

    def warmup(self, lengths_s=(None,), batch_sizes=(1,), prompt: str = "warm-up", steps: int = 2) -> float:
        """Run each (length, batch) once so that buffers, cuDNN algorithms and CUDA graphs exist before the
        first request (graphs depend on shapes, not on the step count). Returns the seconds taken."""
        start = time.perf_counter()
        for length in lengths_s:
            for batch in batch_sizes:
                self(prompt, num_inference_steps=steps, audio_length_in_s=length, num_waveforms_per_prompt=batch,
                     seed=0)
        self._warm = True
        return time.perf_counter() - start

    def health(self) -> dict:
        """What a server's health check reports: device, precision, warm or not, and per component
        how many input shapes have buffers / CUDA graphs."""
        return {
            "ok": bool(self._sessions), "device": str(self.device), "precision": self.artifacts.precision,
            "warm": self._warm,
            "components": {n: {"graphs": s.stats.graphs, "runs": s.stats.runs, "shapes": len(s.stats.keys),
                               "uncaptured_shapes": s.stats.uncaptured_keys}
                           for n, s in self._sessions.items() if hasattr(s, "stats")},
        }

    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int = 20, guidance_scale: float = 3.5,
                 audio_length_in_s: float | None = None, num_waveforms_per_prompt: int = 1, seed: int | None = None,
                 latents: np.ndarray | None = None, scheduler: str = "dpmsolver++",
                 callback: StepCallback | None = None, timings: dict | None = None) -> AudioOutput:
        """Generate audio; arguments as diffusers' ``AudioLDM2Pipeline.__call__`` (see README).

        ``timings``: a dict to fill with wall-clock seconds per stage ("text", "unet" (a list, one per
        step), "vae", "vocoder", "ranking", "total"), for benchmarks.
        """
        if not self._sessions:
            raise BackendError("this runtime was closed; load the artefacts again")
        clock = _Clock(timings)
        # 1. Check the request once, up front.
        req = build_request(self.constants, self._scheduler_config, prompt, negative_prompt, num_inference_steps,
                            guidance_scale, audio_length_in_s, num_waveforms_per_prompt, seed, latents, scheduler)
        # 2. Prompt → conditioning (CLAP, T5, projection, GPT-2), negatives first under CFG.
        tokens = tokenize_prompts(self._clap_tok, self._t5_tok, req.prompts, req.negative_prompts)
        cond = encode_text(self._sessions, tokens, self._clap_tok.pad_token_id).repeat_rows(req.waveforms_per_prompt)
        clock.mark("text")
        # 3. Initial latents.
        latents, seed = self._initial_latents(req)
        # 4. Denoising loop.
        latents = self._denoise(req, cond, latents, callback, clock)
        # 5. Latents → mel → waveform, trimmed to the requested length.
        mel = check_finite("vae_decoder", self._sessions["vae_decoder"].run({"latents": latents})["mel"])
        clock.mark("vae")
        audio = check_finite("vocoder", self._sessions["vocoder"].run({"mel": mel})["waveform"])
        audio = np.ascontiguousarray(audio[:, : req.shape.samples], dtype=np.float32)
        clock.mark("vocoder")
        # 6. Rank each prompt's waveforms by CLAP similarity.
        scores = None
        if req.waveforms_per_prompt > 1:
            order, scores = rank_per_prompt(audio, cond.clap_text, req.waveforms_per_prompt, self.sample_rate,
                                            self._clap_features, self._sessions["clap_audio"])
            audio = audio[order]
            clock.mark("ranking")
        clock.finish()
        return AudioOutput(audio, self.sample_rate, seed, scores)

    def _initial_latents(self, req: Request) -> tuple[np.ndarray, int | None]:
        """float32 [B, C, F, M] from ``np.random.default_rng(seed).standard_normal`` (PCG64), or the given latents."""
        if req.latents is not None:
            return req.latents.copy(), None
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        shape = (req.batch, self.constants["latent_channels"], req.shape.latent_frames, self.constants["latent_bins"])
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32), seed

    def _denoise(self, req: Request, cond: Conditioning, latents: np.ndarray,
                 callback: StepCallback | None, clock: "_Clock") -> np.ndarray:
        plan = make_plan(req.scheduler, self._scheduler_config, req.steps)
        state = SolverState()
        latents = latents * np.float32(plan.init_noise_sigma)
        unet = self._sessions["unet"]
        t5, t5_mask = cond.padded_t5(t5_bucket(cond.t5.shape[1]))
        feeds = {"encoder_hidden_states": cond.generated, "encoder_hidden_states_1": t5,
                 "encoder_attention_mask_1": t5_mask}
        for i, t in enumerate(plan.timesteps):
            sample = np.concatenate([latents, latents]) if req.do_cfg else latents
            eps = unet.run({**feeds, "sample": sample, "timestep": np.array([t], dtype=np.int64)})["noise_pred"]
            if req.do_cfg:
                uncond, text = np.split(eps, 2)
                eps = uncond + np.float32(req.guidance_scale) * (text - uncond)
            latents = plan.step(i, check_finite(f"unet (step {i})", eps), latents, state)
            clock.mark("unet", append=True)
            if callback is not None:
                callback(i, req.steps)
        return latents

    def close(self) -> None:
        """Release the sessions and their device buffers; the runtime cannot be used afterwards."""
        for session in self._sessions.values():
            if hasattr(session, "close"):
                session.close()
        self._sessions.clear()


class _Clock:
    """Fills a caller's dict with seconds per stage; does nothing without one."""

    def __init__(self, out: dict | None):
        self.out = out
        if out is not None:
            out.clear()
            self.start = self.last = time.perf_counter()

    def mark(self, stage: str, append: bool = False) -> None:
        if self.out is None:
            return
        now = time.perf_counter()
        if append:
            self.out.setdefault(stage, []).append(now - self.last)
        else:
            self.out[stage] = now - self.last
        self.last = now

    def finish(self) -> None:
        if self.out is not None:
            self.out["total"] = time.perf_counter() - self.start
