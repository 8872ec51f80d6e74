"""``AudioLDM2Runtime``: prompt → embeddings → latents → mel → waveform, over exported components.

Shared state (sessions, tokenizers, constants) is read-only after ``load``; everything a request
needs (RNG, scheduler state, buffers) lives in the call, so one runtime serves many threads.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .artifacts import COMPONENTS, RANKING_COMPONENTS, Artifacts, load_artifacts
from .audio import ClapFeatures
from .backends import check_backend
from .backends.base import Device, queued_together
from .backends.ort import OrtSessionFactory
from .backends.ort_session import DEFAULT_MAX_GRAPHS
from .backends.ort_options import CUBLAS_WORKSPACE_KIB, default_tf32, ort_tensorrt_providers
from .errors import BackendError, InvalidRequestError, NonFiniteError, RequestCancelled
from .conditioning import Conditioning, Deferred, check_finite, encode_text
from .denoising import ContextGraph, DeviceStepper, HostStepper, pad_rows
from .lm_loop import LmLoop
from .ranking import rank_per_prompt
from .requests import Request, build_request
from .shapes import batch_bucket, t5_bucket
from .schedulers import Plans
from .tokenization import TextTokenizer, tokenize_prompts

log = logging.getLogger("audioldm2_trt.runtime")

UNET_CONTEXT = "unet_context"  # the session of the UNet's context graph (export/hoist_context.py), where it has one
SOLVER_STEP_GRAPH = Path(__file__).resolve().parent / "graphs" / "solver_step.onnx"  # export/solver_graph.py
LM_APPEND_GRAPH = Path(__file__).resolve().parent / "graphs" / "lm_append.onnx"  # export/lm_append_graph.py
StepCallback = Callable[[int, int], None]  # (step index, number of steps)
# Every session a runtime may open: the components, the UNet's context graph, and the two loops' small graphs
SESSION_NAMES = (*COMPONENTS, UNET_CONTEXT, "solver_step", "lm_append")


@dataclass(frozen=True)
class AudioOutput:
    """audios float32 [prompts × waveforms, samples], prompt-major, each prompt's best first;
    ``seed`` the seed of numpy's PCG64 generator that drew the initial latents (None if given)."""

    audios: np.ndarray
    sample_rate: int
    seed: int | None
    scores: np.ndarray | None = None  # CLAP cosine similarity per row when ranked


def features_graph_on(device: Device) -> bool:
    """Whether the ranking computes its features with the artefacts' ``clap_features`` graph: on a GPU; on the CPU
    soxr and numpy are the faster (ranking.clap_input_features), and ``load`` does not open the graph."""
    return device.kind == "cuda"


def _component_names(option: str, value, known: set):
    """``value`` of a load option that takes None, True, False or component names, with one name given as a string
    taken as that name; names outside ``known`` are an InvalidRequestError naming them."""
    if value is None or isinstance(value, bool):
        return value
    names = (value,) if isinstance(value, str) else tuple(value)
    unknown = sorted(set(names) - known)
    if unknown:
        raise InvalidRequestError(f"{option} names unknown components {unknown}; components: {sorted(known)}")
    return names


def captured_except(uncaptured) -> tuple[str, ...]:
    """A ``cuda_graphs`` choice for ``load``: every session in ``SESSION_NAMES`` captured but ``uncaptured`` (one
    name, or names), which run without a CUDA graph."""
    if isinstance(uncaptured, bool):
        raise InvalidRequestError(f"uncaptured: expected session names, got {uncaptured!r}")
    left_out = set(_component_names("uncaptured", uncaptured, set(SESSION_NAMES)) or ())
    return tuple(n for n in SESSION_NAMES if n not in left_out)


class AudioLDM2Runtime:
    def __init__(self, artifacts: Artifacts, sessions: dict, device: Device, solver_step=None, lm_append=None,
                 backend: str = "ort"):
        """sessions: one per component (``Session`` protocol), made by ``backend`` (``backends.BACKENDS``, what
        ``health()`` reports); solver_step: an ONNX Runtime session of
        ``SOLVER_STEP_GRAPH`` on the UNet's device, bound like it, to keep the denoising loop on the device
        (``denoising.DeviceStepper``), or None for the loop on the host; lm_append: likewise a session of
        ``LM_APPEND_GRAPH`` beside a bound GPT-2 step graph, to keep GPT-2's passes on the device
        (``lm_loop.LmLoop``), or None for them on the host."""
        self.artifacts = artifacts
        self.constants = artifacts.constants
        self.device = device
        self.backend = backend
        self.sample_rate = self.constants["sampling_rate"]
        self._sessions = sessions
        self._solver_step = solver_step
        context = artifacts.context("unet")
        if context and UNET_CONTEXT not in sessions:
            raise InvalidRequestError(f"{artifacts.folder}: its UNet reads the outputs of its context graph "
                                      f"({context['file']}); give its session as {UNET_CONTEXT!r} "
                                      "(Artifacts.session_files lists it)")
        self._unet_context = None if not context else ContextGraph(
            sessions[UNET_CONTEXT], context, getattr(sessions["unet"], "max_graphs", DEFAULT_MAX_GRAPHS))
        self._solver_buffers: dict = {}  # denoising.SolverBuffers per UNet shape key (DeviceStepper.open)
        self._lm_append = lm_append
        self._lm_loop = None if lm_append is None else LmLoop(
            sessions["gpt2"], lm_append, self.constants["lm_max_positions"],
            max(1, getattr(sessions["gpt2"], "max_graphs", DEFAULT_MAX_GRAPHS) // 2))
        toks = artifacts.manifest["tokenizers"]
        self._clap_tok = TextTokenizer(artifacts.tokenizer_file("clap"), toks["clap"]["model_max_length"],
                                       toks["clap"]["pad_token_id"], "CLAP",
                                       artifacts.length_multiple("clap_text"))
        self._t5_tok = TextTokenizer(artifacts.tokenizer_file("t5"), toks["t5"]["model_max_length"],
                                     toks["t5"]["pad_token_id"], "T5")
        self._clap_features = ClapFeatures.from_config(artifacts.manifest["feature_extractor"])
        self._features_graph = sessions.get("clap_features") if features_graph_on(device) else None
        self.ranking = "clap_audio" in sessions  # load(ranking=False) leaves CLAP's audio branch out
        self._scheduler_config = artifacts.manifest["scheduler"]
        self._plans = Plans(self._scheduler_config)
        self._warm = False

    @classmethod
    def load(cls, folder, device: str = "cpu", providers: list | None = None, threads: int = 0,
             cuda_graphs="auto", max_graphs: int = DEFAULT_MAX_GRAPHS, backend: str = "ort",
             tf32: bool | None = None, provider_options: dict | None = None,
             device_loop: bool | None = None, ranking: bool = True,
             cublas_workspace_kib: int | None = CUBLAS_WORKSPACE_KIB, shared_arena=None,
             packed_weights=None, weights_block=None, queued_steps: bool | None = None,
             lm_loop: bool | None = None) -> "AudioLDM2Runtime":
        """Open an artefact folder written by ``audioldm2-trt export``.

        device: "cpu", "cuda" or "cuda:N" (never a silent fallback); providers: ONNX Runtime
        execution providers to use instead of the device's default; threads: intra-op threads (0 = ORT default).
        cuda_graphs (CUDA only): capture one CUDA graph per component and input shape — "auto" (each
        component whose graph ONNX Runtime accepts, but CLAP's text branch and the projection, which run once per
        request: ``backends.ort.UNCAPTURED_BY_DEFAULT``, ~1 ms a request for 12-14 MiB less peak memory, run BP; a
        component ONNX Runtime refuses runs without a graph, with a warning, and ``health()`` names it), True (all, a
        refusal is an error), False, or the component names to capture (``SESSION_NAMES``; ``captured_except`` names
        the others, ``captured_except(())`` captures every one); max_graphs: shapes captured per component (later ones
        run uncaptured).
        tf32 (CUDA only): TF32 tensor cores for the fp32 parts; None = on for fp16 artefacts, off for fp32 ones.
        provider_options (default CUDA provider only): extra CUDA provider options per component, e.g.
        ``{"unet": {"sdpa_kernel": 0}}`` (ORT's own attention kernel choice), over the defaults in
        ``backends.ort_options.COMPONENT_PROVIDER_OPTIONS`` (fp16 artefacts; fp32 ones:
        ``FP32_COMPONENT_PROVIDER_OPTIONS``).
        device_loop (backend "ort"): keep the denoising loop's latents on the device, guidance and the solver
        update in a small ONNX graph (denoising.py); None = on CUDA with the default provider, off elsewhere;
        True on the CPU binds every session (for tests).
        queued_steps (the device loop on CUDA, default provider, CUDA graphs): the UNet, its context graph and the
        solver step share one CUDA stream, and each step is queued behind the one before without waiting for it
        (``denoising.DeviceStepper``): the GPU does not idle while the host reads a step's finiteness flags and calls
        back; those then come one step late. None = on wherever it applies, False = every step waited for, True = on
        and an error where it does not apply.
        lm_loop (backend "ort", artefacts with GPT-2's step graph): GPT-2's 8 passes over device buffers, the
        sequence grown on the device by a small append graph (``lm_loop.LmLoop``) — queued on one CUDA stream and
        waited for once where ``queued_steps`` applies; None = on wherever the device loop is, False = the passes on
        the host (the sequence copied in and out at each), True = on, and an error where it does not apply.
        ranking: open CLAP's audio branch (and its log-mel features graph), which ranks several waveforms per
        prompt. ``ranking=False`` leaves those sessions out — for a server that asks for one waveform per prompt:
        less GPU memory and a shorter load — and a request for more than one waveform per prompt is then an error.
        cublas_workspace_kib (CUDA): cuBLAS's workspace per handle, 256 KiB by default, set through the process's
        CUBLAS_WORKSPACE_CONFIG unless that is set already (``backends.ort_options.limit_cublas_workspace``): cuBLAS's
        own default cost ~1.1 GiB over the runtime's sessions on the H100 for no speed; None keeps cuBLAS's default.
        shared_arena (backend "ort", default providers): the components whose sessions share one ONNX Runtime arena
        for their activations instead of one each (``backends/shared_arena.py``) — None = on CUDA the decode
        stage's (vae_decoder, vocoder, clap_features, clap_audio: ``backends.ort.SHARED_ARENA_DEFAULT``; about
        130 MiB less peak memory than one arena per session, run BN), none on the CPU, and where another runtime of
        the process has served already, none (logged: no session may join the arena after a capture); False = none
        (one arena per session); True = every component; or component names (a component with no session in this
        load — CLAP's features on the CPU, the ranking's with ``ranking=False`` — is left out).
        ``health()["shared_arena"]`` names those on it.
        **On CUDA, sessions with CUDA graphs only among the decode stage's** (``CAPTURED_ON_ARENA_CHECKED``), others
        only uncaptured (``cuda_graphs=captured_except(names)``): captured sessions on it gave two runtimes of one
        process driven at once wrong audio until the runtime's buffers were its own there, and only the decode stage's
        are checked since (runs BD-BN, docs/benchmarks.md); other choices are an InvalidRequestError. Every runtime of the
        process that shares the arena by an explicit choice must be loaded before any of them serves (a session cannot
        join it after a capture: an error). On the CPU it is ordinary arena use.
        packed_weights (backend "ort", default CUDA provider): the components whose weights are placed in one device
        allocation each instead of one per initializer (``backends.ort.OrtSessionFactory``): None = the text stack,
        the ranking components and a UNet exported with ``--unet-layout nchw`` on CUDA (NHWC convolutions cannot be
        packed: the default UNet's, the VAE decoder's, the vocoder's), False = none (ONNX Runtime's default), True =
        every component that allows it, or component names.
        weights_block (backend "ort", default providers): the components whose weights the runtime places in one
        allocation of its own and hands to ONNX Runtime (``backends/weights_block.py``), for those that cannot be
        packed: None = on CUDA the ones with NhwcConv nodes (the default UNet and VAE decoder), none on the CPU;
        False = none; True = every component not packed (the vocoder's ``prefer_nhwc`` excepted); or names.
        backend: "ort" (ONNX Runtime, CPU or CUDA provider), "ort-trt" (ONNX Runtime's TensorRT provider over
        the same ONNX files, engine cache in DIR/ort_trt_cache) or "trt" (engines from `audioldm2-trt build`).
        """
        art = load_artifacts(folder)
        dev = check_backend(backend, device)
        if cuda_graphs != "auto":  # names outside SESSION_NAMES are an error, not sessions silently uncaptured
            cuda_graphs = _component_names("cuda_graphs", cuda_graphs, set(SESSION_NAMES))
        art.check_device(dev.kind)
        if provider_options and (backend != "ort" or dev.kind != "cuda" or providers is not None):
            raise InvalidRequestError("provider_options apply to backend 'ort' with the default CUDA provider; "
                                      f"got backend {backend!r}, device {device!r}, "
                                      f"providers {'given' if providers is not None else 'default'}")
        names = [name for name in art.manifest["components"]
                 if (ranking or name not in RANKING_COMPONENTS) and (name != "clap_features" or features_graph_on(dev))]
        files = art.session_files(names)  # with the UNet's context graph, where it has one (export/hoist_context.py)
        if shared_arena not in (None, False) and (backend != "ort" or providers is not None):
            raise InvalidRequestError(f"shared_arena applies to backend 'ort' with the default provider; got backend "
                                      f"{backend!r}, providers {'given' if providers is not None else 'default'}")
        if queued_steps and backend != "ort":
            raise InvalidRequestError(f"queued_steps applies to backend 'ort' (its device loop); got backend {backend!r}")
        if packed_weights not in (None, False) and (backend != "ort" or providers is not None):
            raise InvalidRequestError(f"packed_weights applies to backend 'ort' with the default provider; got backend "
                                      f"{backend!r}, providers {'given' if providers is not None else 'default'}")
        if weights_block not in (None, False) and (backend != "ort" or providers is not None):
            raise InvalidRequestError(f"weights_block applies to backend 'ort' with the default provider; got backend "
                                      f"{backend!r}, providers {'given' if providers is not None else 'default'}")
        if device_loop and backend != "ort":
            raise InvalidRequestError(f"device_loop runs on backend 'ort' (ONNX Runtime sessions); got backend {backend!r}")
        if backend == "trt":
            from .backends.trt import load_engines

            return cls(art, load_engines(art.folder, dev, names), dev, backend=backend)
        if backend == "ort-trt":
            providers = ort_tensorrt_providers(art.folder, dev, art.precision)
        unknown = sorted(set(provider_options or {}) - set(files))
        if unknown:
            raise InvalidRequestError(f"provider_options name unknown components {unknown}; components: {sorted(files)}")
        packed_weights, weights_block = (
            _component_names(option, value, {*files, "solver_step", "lm_append"})
            for option, value in (("packed_weights", packed_weights), ("weights_block", weights_block)))
        # the arena's choice may name a component with no session in this load (CLAP's features on the CPU, the
        # ranking's without ranking), so that one choice serves every device: health() says which are on it
        shared_arena = _component_names("shared_arena", shared_arena,
                                        {*files, *art.manifest["components"], "solver_step", "lm_append"})
        if device_loop is None:
            device_loop = backend == "ort" and dev.kind == "cuda" and providers is None
        if lm_loop and not (device_loop and art.gpt2_graph == "step"):
            raise InvalidRequestError("lm_loop needs the device loop (backend 'ort', I/O bound sessions) and GPT-2's "
                                      f"step graph (device_loop {device_loop}, gpt2 graph {art.gpt2_graph!r})")
        lm_loop = device_loop and art.gpt2_graph == "step" and lm_loop is not False
        loops = {"denoising"} if device_loop else set()
        if lm_loop:
            loops.add("language_model")
        if queued_steps and not (device_loop and dev.kind == "cuda" and providers is None and cuda_graphs):
            raise InvalidRequestError("queued_steps needs the device loop on CUDA with the default provider and CUDA "
                                      f"graphs (backend {backend!r}, device {dev}, device_loop {device_loop}, "
                                      f"cuda_graphs {cuda_graphs!r})")
        factory = OrtSessionFactory.for_artifacts(
            art, dev, providers=providers, threads=threads, cuda_graphs=cuda_graphs, max_graphs=max_graphs,
            tf32=default_tf32(art.precision) if tf32 is None else tf32, component_options=provider_options,
            bind=True if device_loop else None, cublas_workspace_kib=cublas_workspace_kib,
            shared_arena=shared_arena, packed_weights=packed_weights, weights_block=weights_block,
            loop_stream=False if queued_steps is False or not loops else frozenset(loops))
        if queued_steps and any(factory.on_shared_arena(n) for n in ("unet", "unet_context", "solver_step")):
            raise InvalidRequestError("queued_steps: the denoising loop's sessions are on the shared arena "
                                      f"(shared_arena={shared_arena!r}), where each run is waited for; leave them off it")
        sessions = factory.create_all(files)
        solver = factory.create("solver_step", SOLVER_STEP_GRAPH) if device_loop else None
        append = factory.create("lm_append", LM_APPEND_GRAPH) if lm_loop else None
        return cls(art, sessions, factory.device, solver, append, backend=backend)

    def warmup(self, lengths_s=(None,), batch_sizes=(1,), t5_buckets=(16,), steps: int = 2) -> float:
        """Run each (length, batch, T5 bucket) once so that buffers, cuDNN algorithms and CUDA graphs exist
        before the first request (graphs depend on shapes, not on the step count). ``t5_buckets``: T5 lengths
        (see ``shapes.t5_bucket``) the UNet should be ready for — a prompt of 17…32 T5 tokens meets other
        UNet shapes than one of ≤ 16. Returns the seconds taken."""
        start = time.perf_counter()
        for bucket in t5_buckets:
            prompt = self.prompt_in_t5_bucket(bucket)
            for length in lengths_s:
                for batch in batch_sizes:
                    # several waveforms of one prompt (ranked) or, without ranking, one each of several prompts:
                    # the same UNet, VAE and vocoder batch
                    self(prompt if self.ranking else [prompt] * batch, num_inference_steps=steps,
                         audio_length_in_s=length, num_waveforms_per_prompt=batch if self.ranking else 1, seed=0)
        self._warm = True
        return time.perf_counter() - start

    def unet_feeds(self, conditioning: dict) -> dict:
        """The UNet session's feeds for its conditioning feeds (``encoder_hidden_states``, ``encoder_hidden_states_1``,
        ``encoder_attention_mask_1``; host arrays): through the UNet's context graph where it has one, else as given.
        For measuring the UNet session alone (scripts/benchmark.py)."""
        return conditioning if self._unet_context is None else self._unet_context.host_feeds(conditioning)

    def prompt_in_t5_bucket(self, tokens: int) -> str:
        """A prompt whose T5 token count lands in the same ``t5_bucket`` as ``tokens``."""
        if not 1 <= tokens <= self._t5_tok.model_max_length:
            raise InvalidRequestError(f"T5 bucket of {tokens} tokens: the range is 1…{self._t5_tok.model_max_length}")
        words = ["warm-up"]
        while t5_bucket(self._t5_tok.encode([" ".join(words)], warn=False).length) < t5_bucket(tokens):
            words.append("sound")
        return " ".join(words)

    def health(self) -> dict:
        """What a server's health check reports: device, backend, precision, warm or not, whether the denoising loop
        runs on the device (``device_loop``) with its steps queued (``queued_steps``), whether GPT-2's passes do
        (``lm_loop``) and are queued (``lm_queued``), whether ranking is loaded and where its features are computed ("graph" or "host"; None
        without ranking), the components on the device's shared arena (``shared_arena``, a sorted list), the
        CUBLAS_WORKSPACE_CONFIG in effect (CUDA), and per component how many times it ran (``runs``), how many
        input shapes have buffers / CUDA graphs, whether its weights are packed in one allocation
        (``packed_weights``) and the bytes of its weights in a block of the runtime's own (``weights_block``, 0 for
        none)."""
        return {
            "ok": bool(self._sessions), "device": str(self.device), "backend": self.backend,
            "precision": self.artifacts.precision,
            "warm": self._warm, "device_loop": self._solver_step is not None,
            "queued_steps": self._queued_steps(),
            "lm_loop": self._lm_loop is not None, "lm_queued": self._lm_loop is not None and self._lm_loop.queued,
            "ranking": self.ranking, "shared_arena": self.shared_arena,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG") if self.device.kind == "cuda" else None,
            "ranking_features": None if not self.ranking else "graph" if self._features_graph is not None else "host",
            "components": {n: {"graphs": s.stats.graphs, "runs": s.stats.runs, "shapes": len(s.stats.keys),
                               "uncaptured_shapes": s.stats.uncaptured_keys,
                               "graph_refused": bool(s.stats.graph_refused),
                               "packed_weights": s.stats.packed_weights,
                               "weights_block": s.stats.weights_block}
                           for n, s in self._sessions.items() if hasattr(s, "stats")},
        }

    @property
    def shared_arena(self) -> list[str]:
        """The components whose sessions are on the device's shared arena (``load(shared_arena=...)``), sorted."""
        sessions = {**self._sessions, "solver_step": self._solver_step, "lm_append": self._lm_append}
        return sorted(n for n, s in sessions.items() if getattr(getattr(s, "stats", None), "shared_arena", False))

    def _queued_steps(self) -> bool:
        """Whether the device loop queues its steps (``DeviceStepper``): the UNet and the solver step on one stream,
        both captured."""
        return queued_together(self._sessions.get("unet"), self._solver_step)

    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int = 20, guidance_scale: float = 3.5,
                 audio_length_in_s: float | None = None, num_waveforms_per_prompt: int = 1, seed: int | None = None,
                 latents: np.ndarray | None = None, scheduler: str = "dpmsolver++",
                 callback: StepCallback | None = None, timings: dict | None = None, cancel=None) -> AudioOutput:
        """Generate audio; arguments as diffusers' ``AudioLDM2Pipeline.__call__`` (see README).

        callback(step, steps) after each denoising step; cancel: anything with ``is_set()`` (a
        ``threading.Event``), checked between steps — when set, RequestCancelled is raised. With the device
        loop a callback runs on the UNet's worker thread while this request holds the UNet: it must be quick and
        must not call this runtime (that call would wait for the UNet forever); an exception it raises ends the
        request with that exception.
        ``timings``: a dict to fill with wall-clock seconds per stage ("text", "unet" (a list, one per
        step), "vae", "vocoder", "ranking", "total"), for benchmarks.
        """
        item = self.prepare(prompt, negative_prompt, num_inference_steps, guidance_scale, audio_length_in_s,
                            num_waveforms_per_prompt, seed, latents, scheduler, callback, timings, cancel)
        result = self.run_batch([item])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def prepare(self, prompt, negative_prompt=None, num_inference_steps: int = 20, guidance_scale: float = 3.5,
                audio_length_in_s: float | None = None, num_waveforms_per_prompt: int = 1, seed: int | None = None,
                latents: np.ndarray | None = None, scheduler: str = "dpmsolver++",
                callback: StepCallback | None = None, timings: dict | None = None, cancel=None) -> "Prepared":
        """Check one request and run its text stage: prompt → conditioning rows and initial latents."""
        if not self._sessions:
            raise BackendError("this runtime was closed; load the artefacts again")
        clock = _Clock(timings)
        # 1. Check the request once, up front.
        req = build_request(self.constants, self._scheduler_config, prompt, negative_prompt, num_inference_steps,
                            guidance_scale, audio_length_in_s, num_waveforms_per_prompt, seed, latents, scheduler)
        if req.waveforms_per_prompt > 1 and not self.ranking:
            raise InvalidRequestError(f"num_waveforms_per_prompt={req.waveforms_per_prompt} needs CLAP ranking, and this "
                                      "runtime was loaded with ranking=False: the allowed value is 1 (or load with "
                                      "ranking=True)")
        # 2. Prompt → conditioning (CLAP, T5, projection, GPT-2), negatives first under CFG; 3. the initial latents,
        # drawn on the host while the device runs GPT-2's passes (where they are queued: encode_text's meanwhile).
        tokens = tokenize_prompts(self._clap_tok, self._t5_tok, req.prompts, req.negative_prompts)
        initial = Deferred(lambda: self._initial_latents(req))
        cond = encode_text(self._sessions, tokens, self._clap_tok.pad_token_id, self.constants,
                           stepwise=self.artifacts.gpt2_graph == "step", lm_loop=self._lm_loop,
                           meanwhile=initial).repeat_rows(req.waveforms_per_prompt)
        clock.mark("text")
        latents, seed = initial.result()
        return Prepared(req, cond, latents, seed, callback, cancel, clock)

    def run_batch(self, items: list["Prepared"]) -> list:
        """Denoise and decode prepared requests of one ``batch_key`` together; returns, per item, its
        AudioOutput or the exception that ended it (cancelled, non-finite rows). One item's failure
        removes its rows and leaves the others running."""
        if len({it.batch_key for it in items}) != 1:
            raise ValueError(f"items of different batch keys cannot share a batch: {[it.batch_key for it in items]}")
        results: list = [None] * len(items)
        live = self._denoise(items, results)
        if live:
            self._decode([items[k] for k in live], [k for k in live], results)
        for it in items:
            it.clock.finish()
        return results

    def _initial_latents(self, req: Request) -> tuple[np.ndarray, int | None]:
        """float32 [B, C, F, M] from ``np.random.default_rng(seed).standard_normal`` (PCG64), or the given latents."""
        if req.latents is not None:
            return req.latents.copy(), None
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        shape = (req.batch, self.constants["latent_channels"], req.shape.latent_frames, self.constants["latent_bins"])
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32), seed

    def _denoise(self, items: list["Prepared"], results: list) -> list[int]:
        """The denoising loop over every live item's rows at once; returns the indices still live.

        The rows' state (x, prev_x0) lives in a stepper (denoising.py) — on the device where the backend allows —
        which runs steps until the live set changes (an item cancelled before a step, or non-finite after one):
        then the state is read back, those items dropped, and a new stepper takes the rest from the next step.
        After each step, per live item: its clock and progress callback (on the UNet's worker thread with the
        device loop)."""
        first = items[0].req
        plan = self._plans.get(first.scheduler, first.steps)
        x = {k: it.latents * np.float32(plan.init_noise_sigma) for k, it in enumerate(items)}
        prev: dict = {k: None for k in x}
        live = list(range(len(items)))
        i = 0
        while i < len(plan.timesteps):
            cancelled = [k for k in live if _cancelled(items[k])]
            for k in cancelled:
                results[k] = RequestCancelled(f"request cancelled before denoising step {i} of {first.steps}")
            live = [k for k in live if k not in cancelled]
            if not live:
                return live
            failed: list[int] = []

            def after_step(step: int, finite: np.ndarray, live=live, failed=failed) -> bool:
                """Items with a non-finite row fail; the others' clocks and callbacks. False: the live set changes."""
                offset = 0
                for k in live:
                    rows = len(x[k])
                    if not finite[offset: offset + rows].all():
                        results[k] = NonFiniteError(f"unet (step {step}) produced non-finite values (NaN or Inf)")
                        failed.append(k)
                    else:
                        items[k].clock.mark("unet", append=True)
                        if items[k].callback is not None:
                            items[k].callback(step, first.steps)
                    offset += rows
                return not failed and not any(_cancelled(items[k]) for k in live)

            stepper = self._stepper(items, live, x, prev, int(plan.timesteps[i]))
            try:
                i = stepper.run(plan, i, after_step)
                _read_back(stepper, live, x, prev)
            finally:
                stepper.close()
            live = [k for k in live if k not in failed]
        for k in live:
            items[k].latents = x[k]
        return live

    def _stepper(self, items, live, x, prev, t: int):
        """A stepper over the live items' rows: on the device when this runtime has the solver-step graph and
        the UNet has buffers for the shape, else on the host."""
        chosen = [items[k] for k in live]
        cfg = chosen[0].req.do_cfg
        feeds, guidance = _unet_conditioning(chosen, t5_bucket(max(it.cond.t5.shape[1] for it in chosen)))
        padded = batch_bucket(len(guidance))
        feeds = {k: _pad_halves(v, padded, cfg) for k, v in feeds.items()}
        xs = np.concatenate([x[k] for k in live])
        prevs = None if prev[live[0]] is None else np.concatenate([prev[k] for k in live])
        unet, context = self._sessions["unet"], self._unet_context
        if self._solver_step is not None:
            stepper = DeviceStepper.open(unet, self._solver_step, feeds, guidance, padded, cfg, xs, prevs, t,
                                         self._solver_buffers, self._scheduler_config["num_train_timesteps"], context)
            if stepper is not None:
                return stepper
        return HostStepper.open(unet, feeds, guidance, padded, cfg, xs, prevs, context)

    def _decode(self, items: list["Prepared"], index: list[int], results: list) -> None:
        """Latents → mel → waveform for all items at once, then trim and rank per item."""
        sizes = [len(it.latents) for it in items]
        padded = batch_bucket(sum(sizes))
        mel = self._sessions["vae_decoder"].run({"latents": pad_rows(np.concatenate([it.latents for it in items]),
                                                                     padded)})["mel"]
        for it in items:
            it.clock.mark("vae")
        audio = self._sessions["vocoder"].run({"mel": mel})["waveform"]
        for it in items:
            it.clock.mark("vocoder")
        bounds = np.cumsum([0] + sizes)
        for it, k, lo, hi in zip(items, index, bounds[:-1], bounds[1:]):
            req = it.req
            try:
                check_finite("vae_decoder", mel[lo:hi])
                rows = check_finite("vocoder", np.ascontiguousarray(audio[lo:hi, : req.shape.samples], dtype=np.float32))
                scores = None
                if req.waveforms_per_prompt > 1:  # rank each prompt's waveforms by CLAP similarity
                    order, scores = rank_per_prompt(rows, it.cond.clap_text, req.waveforms_per_prompt,
                                                    self.sample_rate, self._clap_features, self._sessions["clap_audio"],
                                                    self._features_graph)
                    rows = rows[order]
                    it.clock.mark("ranking")
                results[k] = AudioOutput(rows, self.sample_rate, it.seed, scores)
            except NonFiniteError as err:
                results[k] = err

    def __enter__(self) -> "AudioLDM2Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the sessions and their device buffers; the runtime cannot be used afterwards (a call raises
        BackendError). Closing twice is harmless; ``with AudioLDM2Runtime.load(...) as rt:`` closes on leaving."""
        if self._unet_context is not None:
            self._unet_context.close()
        if self._lm_loop is not None:
            self._lm_loop.close()
        for session in [*self._sessions.values(), self._solver_step, self._lm_append]:
            if hasattr(session, "close"):
                session.close()
        self._sessions.clear()
        self._solver_buffers.clear()
        self._solver_step = self._lm_append = self._lm_loop = None


@dataclass
class Prepared:
    """One request after its text stage. ``cond`` rows are [negatives; positives] under CFG (B each),
    ``latents`` float32 [B, C, F, M] (the final latents once denoised)."""

    req: Request
    cond: Conditioning
    latents: np.ndarray
    seed: int | None
    callback: StepCallback | None
    cancel: object | None
    clock: "_Clock"

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share the UNet, VAE and vocoder batch."""
        return (self.req.shape.latent_frames, self.req.steps, self.req.scheduler, self.req.do_cfg)


def _cancelled(item: "Prepared") -> bool:
    return item.cancel is not None and item.cancel.is_set()


def _read_back(stepper, live: list[int], x: dict, prev: dict) -> None:
    """Copy the stepper's rows into x / prev per item (rows in ``live`` order), then close it."""
    rows_x, rows_prev = stepper.read()
    stepper.close()
    offset = 0
    for k in live:
        n = len(x[k])
        x[k] = rows_x[offset: offset + n]
        prev[k] = None if rows_prev is None else rows_prev[offset: offset + n]
        offset += n


def _pad_halves(x: np.ndarray, rows: int, cfg: bool) -> np.ndarray:
    """Conditioning rows laid out [negatives; positives] under CFG: pad each half to ``rows`` (x itself where each
    half has them)."""
    if not cfg:
        return pad_rows(x, rows)
    if len(x) == 2 * rows:
        return x
    neg, pos = np.split(x, 2)
    return np.concatenate([pad_rows(neg, rows), pad_rows(pos, rows)])


def _unet_conditioning(items: list[Prepared], t5_len: int) -> tuple[dict, np.ndarray]:
    """UNet feeds for these items' rows, T5 padded to ``t5_len``, plus the per-row guidance scale
    float32 [rows, 1, 1, 1]. Under CFG the rows are [every item's negatives; every item's positives]."""
    parts = []
    for it in items:
        t5, mask = it.cond.padded_t5(t5_len)
        parts.append((it.cond.generated, t5, mask, len(it.latents)))
    cfg = items[0].req.do_cfg

    def rows(j: int) -> np.ndarray:
        if len(parts) == 1:  # one item: its rows are in that order already (read only, as every use of them is)
            return parts[0][j]
        if not cfg:
            return np.concatenate([p[j] for p in parts])
        return np.concatenate([p[j][: p[3]] for p in parts] + [p[j][p[3]:] for p in parts])

    guidance = np.concatenate([np.full(len(it.latents), it.req.guidance_scale, np.float32) for it in items])
    feeds = {"encoder_hidden_states": rows(0), "encoder_hidden_states_1": rows(1), "encoder_attention_mask_1": rows(2)}
    return feeds, guidance[:, None, None, None]


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
