"""ONNX Runtime backend: ``OrtSessionFactory`` opens one session per component on one explicit device — CPU or
CUDA execution provider (or ONNX Runtime's TensorRT provider) over the exported ONNX files — and decides for each
what it runs with: provider options (``ort_options.py``), CUDA graphs, the shared arena, a loop stream, packed
weights or a weights block. The sessions it returns (``ort_session.OrtSession``) run with I/O binding on CUDA."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from ..errors import BackendError, InvalidRequestError
from .base import Device
from .capture_guard import CUDA_CAPTURE_GUARD
from .cuda_driver import CudaStream, caller_context_kept, cuda_device_count
from .ort_options import (CUBLAS_WORKSPACE_KIB, GRAPH_OPTIMIZATION, cuda_provider_options, default_component_options,
                          default_mem_pattern, limit_cublas_workspace, merge_component_options)
from .ort_session import DEFAULT_MAX_GRAPHS, OrtSession
from .shared_arena import SESSION_CONFIG as SHARED_ARENA_CONFIG
from . import shared_arena as _shared_arena_module
from .shared_arena import shared_arena as _shared_arena
from .weights_block import WeightsBlock

log = logging.getLogger("audioldm2_trt.runtime")

# Sessions that cuda_graphs="auto" runs without a CUDA graph: CLAP's text branch and the projection run once per
# request, so a graph saves them little (0.7-1.2 ms a request on the H200, run BP), and their captures grew the
# runtime's peak by 32 MiB at its fourth request (runs BC-BD). With the 256 KiB cuBLAS workspace this puts the fp16
# runtime's peak GPU memory under B0's: 3120 against 3126 MiB (run BP; 3150 with both captured and 1 MiB).
# cuda_graphs=True, or names, captures them too.
UNCAPTURED_BY_DEFAULT = frozenset({"clap_text", "projection"})
# Components whose weights a CUDA session places in one device block by default (OrtSessionFactory's packed_weights):
# all but the VAE decoder and the vocoder, and the UNet only where it has no NHWC convolutions. Those need ONNX
# Runtime's prepacking, which packing turns off: without it the fused UNet's NhwcConv nodes read their NHWC weights as
# NCHW and fail ("Input channels C is not equal to kernel channels * group", H100, 2026-11-27); the VAE decoder's
# NhwcConv and the vocoder's prefer_nhwc likewise. ``export --unet-layout nchw`` gives a UNet that can be packed. (The
# VAE decoder would gain less than the memory pattern, which packing turns on, costs its first run: runs N and Q.)
# The NhwcConv components' weights go into a block of the runtime's own instead (``weights_block``, WeightsBlock:
# prepacking stays on; −150 MiB for the fused UNet and VAE decoder, run AY).
PACKED_WEIGHTS = frozenset({"clap_text", "t5_encoder", "projection", "gpt2", "unet", "unet_context", "clap_features",
                            "clap_audio"})
# Where a factory is not told which components have NhwcConv nodes (``needs_prepacking=None``), the fused ones of the
# default fp16 export are assumed to: a UNet packed by mistake fails at its first run.
ASSUMED_NHWC = frozenset({"unet", "vae_decoder"})
PACKED_CONFIG = {"session.disable_prepacking": "1"}
# ONNX Runtime's session config key naming graph rewrites not to apply (";"-separated): ``disabled_optimizers``
DISABLE_OPTIMIZERS_KEY = "optimization.disable_specified_optimizers"
# The sessions of the two loops, which a CUDA factory puts on one stream of its own per loop (``loop_stream``): the
# denoising loop's UNet reads what its context graph wrote and the solver step what the UNet wrote, and GPT-2's pass
# reads the sequence its append graph wrote, in stream order, so a step or pass can be queued behind the one before
# without waiting for it (``OrtSession.replay(wait=False)``, runtime/denoising.py, runtime/lm_loop.py). Two streams:
# one request's text stage can still overlap another's denoising on the GPU.
LOOP_STREAMS = {"unet": "denoising", "unet_context": "denoising", "solver_step": "denoising",
                "gpt2": "language_model", "lm_append": "language_model"}
# The decode stage's sessions: on the shared arena (``shared_arena.py``) by default with the default CUDA provider
# (``SHARED_ARENA_DEFAULT``; within a request they run one after another, so sharing costs it nothing), and on CUDA
# the only sessions that may be there with CUDA graphs (``check_shared_arena_choice``; any session that captures none
# may be too): the ones checked at full size since the runtime's bound buffers are its own there (runs BJ-BN); why
# the others stay refused, and the history, is in ``shared_arena.py``'s docstring.
DECODE_STAGE = frozenset({"vae_decoder", "vocoder", "clap_features", "clap_audio"})
CAPTURED_ON_ARENA_CHECKED = DECODE_STAGE
SHARED_ARENA_DEFAULT = DECODE_STAGE


def default_shared_arena(default_cuda: bool):
    """``shared_arena=None`` resolved: ``SHARED_ARENA_DEFAULT`` (the decode stage's) with the default CUDA provider
    (``default_cuda``), else False (the CPU, or providers given: one arena per session)."""
    return SHARED_ARENA_DEFAULT if default_cuda else False


class OrtSessionFactory:
    """Creates sessions on one explicit device. ``device="cuda"`` without a working CUDA provider is
    an error, never a silent CPU run.

    cuda_graphs: capture a CUDA graph per shape key — "auto" (every component whose graph ONNX Runtime
    accepts but ``UNCAPTURED_BY_DEFAULT``'s, CLAP's text branch and the projection; a component it refuses, because
    some node of it runs on the CPU, runs on the GPU without a graph, with a warning, and ``stats.graph_refused`` says
    why), True (every component; a refusal is an error), False (none), or a collection of component names (those; a
    refusal is an error).
    bind: use I/O binding on the CPU too (for tests; CUDA always binds). tf32: let the CUDA provider
    use TF32 tensor cores for fp32 MatMul/Conv (see ``cuda_provider_options``). graph_optimization: ONNX Runtime's
    optimisation level at session creation, one of ``GRAPH_OPTIMIZATION`` (for measurements: the artefacts are
    fused offline already). precision: the artefacts' ("fp16" or "fp32"), which picks the per-component defaults
    (``default_component_options``) under ``component_options``. optimized_cache: a folder for ONNX Runtime's optimised graphs — a session whose
    optimised graph is there loads it with optimisation off; else it is optimised and written there (for
    measurements of session-creation time; the graph written is specific to this ONNX Runtime, provider and GPU).
    session_config: extra ONNX Runtime session config entries for every session (for measurements).
    cublas_workspace_kib (CUDA): cuBLAS's workspace per handle, set through CUBLAS_WORKSPACE_CONFIG unless the process
    sets it already (``limit_cublas_workspace``); None leaves cuBLAS's default.
    shared_arena (default providers only): the components whose sessions allocate their activations from the
    device's one shared arena instead of an arena of their own, and their weights from the device allocator
    (``shared_arena.py``) — None = ``SHARED_ARENA_DEFAULT`` (the decode stage's) with the default CUDA provider, none
    elsewhere, and where it finds the arena captured already (another runtime of the process, still open, has
    served) those sessions keep arenas of their own (logged), where a choice made explicitly raises; False = none;
    True = every component; or a collection of names. On CUDA sessions that capture CUDA graphs may be named only
    among the decode stage's (``check_shared_arena_choice``: other captured ones gave wrong audio with two runtimes at
    once and are not checked since the fix, runs BD-BN; ``shared_arena.ALLOW_ON_CUDA`` lifts that for diagnosis), any
    session that captures none; there its runs take turns, each holding the arena's lock until its outputs are
    synchronised, so they are never queued on a loop stream, and no session may join the arena while a session on it
    that has captured a graph is open.
    mem_pattern: ONNX Runtime's memory pattern (``SessionOptions.enable_mem_pattern``: each run's activations planned
    as one block) — None = off on CUDA, on on the CPU. Off, activations are allocated tensor by tensor, and the
    arena reuses the blocks a run freed within that run: on the H100 the fp16 runtime's first call grew by 450 MiB
    instead of 634 (the VAE 132 instead of 214, the vocoder 142 instead of 208), the same audio and no speed change
    measured (docs/benchmarks.md, run N). With CUDA graphs only uncaptured runs allocate at all; on the CPU every run
    does, and the pattern saves that work.
    packed_weights (CUDA): the components whose weights ONNX Runtime places in one device allocation instead of one
    allocation per initializer — None = those of ``PACKED_WEIGHTS`` that allow it on CUDA, none on the CPU; True =
    every component that allows it; False = none; or a collection of names. ONNX Runtime allocates each initializer
    of a session with a ``cudaMalloc`` of its own, and CUDA rounds an allocation over 1 MiB up to whole 2 MiB pages
    (measured on the H100: 1.5 MiB costs 2 MiB, 3 MiB costs 4), so a 1.125 MiB fp16 768×768 matrix takes 2 MiB: 87 MiB
    beyond its weights for CLAP text, 61 for T5, 64 for GPT-2, 174 for the UNet (scripts/session_memory.py,
    docs/benchmarks.md).
    ONNX Runtime plans a session's initializers into one buffer only with prepacking off
    (``session.disable_prepacking``) and the memory pattern on; the one switch also plans each uncaptured run's
    activations as one block, so a packed session has the memory pattern on, whatever ``mem_pattern`` says. On CUDA
    prepacking matters to NHWC convolutions only — it transposes the weights of those ``prefer_nhwc`` moved to NHWC
    and tells an ``NhwcConv`` (the fused UNet's and VAE decoder's) that its weights are NHWC already — so those
    components cannot be packed (``weights_block`` does it for them another way): ``needs_prepacking`` names the ones
    with NhwcConv nodes (``Artifacts.nhwc_components``;
    None = ``ASSUMED_NHWC``, the UNet and VAE decoder), and naming one of them, or a ``prefer_nhwc`` one, is an error.
    weights_block (default providers): the components whose weights the runtime itself places in one allocation
    (``weights_block.py``: read from the ONNX file, one ``cudaMalloc``'s worth, handed over as user-owned
    initializers) — for the ones ``packed_weights`` cannot pack because their ``NhwcConv`` nodes need prepacking.
    None = on CUDA, the components with NhwcConv nodes that are not packed (``needs_prepacking``: the fused UNet and
    VAE decoder), none on the CPU; True = every component not packed; False = none; or a collection of names. Not
    for ``prefer_nhwc`` components (the vocoder): prepacking copies their weights, and the block would be a second
    copy; naming one, or a packed one, is an error.
    loop_stream (default CUDA provider with CUDA graphs): the sessions of each loop in ``LOOP_STREAMS`` (the
    denoising loop's, GPT-2's) run on one non-blocking stream per loop that this factory makes (``CudaStream``)
    instead of one stream each, so that the loop can queue its steps without waiting for each
    (``OrtSession.replay(wait=False)``) — None = on wherever it applies, False = off (each session on ONNX Runtime's
    own stream, every run waited for), True = on, and an error where it does not apply; or the loops to give one
    (``{"denoising"}``).
    disabled_optimizers: component name → the ONNX Runtime graph rewrites its session must not apply
    (``optimization.disable_specified_optimizers``), as its manifest entry records them (``for_artifacts``:
    ``Artifacts.disabled_optimizers``; a vocoder exported with its convolution biases as Add nodes keeps them apart
    from the convolutions this way: export/conv_bias.py).
    """

    def __init__(self, device: str | Device = "cpu", providers: list | None = None, threads: int = 0,
                 cuda_graphs="auto", bind: bool | None = None, max_graphs: int = DEFAULT_MAX_GRAPHS,
                 tf32: bool = False, component_options: dict | None = None, graph_optimization: str = "all",
                 optimized_cache: str | Path | None = None, precision: str = "fp16", session_config: dict | None = None,
                 cublas_workspace_kib: int | None = CUBLAS_WORKSPACE_KIB, shared_arena=None,
                 mem_pattern: bool | None = None, packed_weights=None, needs_prepacking=None,
                 weights_block=None, loop_stream: bool | None = None, disabled_optimizers: dict | None = None):
        import onnxruntime as ort

        self.ort = ort
        self.device = Device.parse(device)
        self.threads = threads
        self.max_graphs = max_graphs
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise BackendError(f"graph_optimization {graph_optimization!r} is not one of {', '.join(GRAPH_OPTIMIZATION)}")
        self.graph_optimization = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[graph_optimization])
        if precision not in ("fp16", "fp32"):
            raise BackendError(f"precision {precision!r} is not one of fp16, fp32")
        self.optimized_cache = Path(optimized_cache) if optimized_cache is not None else None
        self.session_config = dict(session_config or {})
        self.disabled_optimizers = {name: tuple(rules) for name, rules in (disabled_optimizers or {}).items()}
        available = ort.get_available_providers()
        custom = providers is not None
        if providers is None:
            if self.device.kind == "cuda":
                providers = [("CUDAExecutionProvider", cuda_provider_options(self.device, tf32))]
            else:
                providers = ["CPUExecutionProvider"]
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        missing = [n for n in names if n not in available]
        if missing:
            raise BackendError(
                f"execution provider(s) {missing} not available in onnxruntime {ort.__version__} "
                f"(available: {available}); for CUDA install onnxruntime-gpu matching your CUDA version"
            )
        if self.device.kind == "cuda" and "CUDAExecutionProvider" not in names and "TensorrtExecutionProvider" not in names:
            raise BackendError(f"device {self.device} asked for, but providers {names} contain no GPU provider")
        if self.device.kind == "cuda":
            _check_gpu_index(ort, self.device)
            limit_cublas_workspace(cublas_workspace_kib)  # before any session: cuBLAS makes its handles in them
        self.providers = providers
        self.providers_given = custom
        # CUDA graphs only with our default CUDA provider (custom provider lists are taken as given).
        self._default_cuda = self.device.kind == "cuda" and not custom
        if component_options and not self._default_cuda:
            raise BackendError("per-component provider options apply to the default CUDA provider only "
                               f"(device {self.device}, providers {'given' if custom else 'default'})")
        self.component_options = merge_component_options(default_component_options(precision), component_options or {})
        use_graphs = self._default_cuda and names[0] == "CUDAExecutionProvider"
        self._graphs_for = _graph_selector(cuda_graphs if use_graphs else False)
        self._graphs_optional = cuda_graphs == "auto"
        self.bind = self.device.kind == "cuda" if bind is None else bind
        if shared_arena not in (None, False) and custom:
            raise BackendError("shared_arena applies to the default CPU or CUDA provider only; providers were given")
        if isinstance(shared_arena, str):  # one component's name, as load takes it
            shared_arena = (shared_arena,)
        self.check_shared_arena_choice(self.device, shared_arena, cuda_graphs if use_graphs else False)
        self._arena_chosen = shared_arena is not None  # chosen: joining a captured arena raises; the default keeps out
        shared_arena = default_shared_arena(self._default_cuda) if shared_arena is None else shared_arena
        self._on_arena = self._arena_selector(shared_arena)
        self.arena = _shared_arena(ort, self.device) if shared_arena not in (None, False) else None
        self.mem_pattern = default_mem_pattern(self.device) if mem_pattern is None else mem_pattern
        nhwc_conv = ASSUMED_NHWC if needs_prepacking is None else frozenset(needs_prepacking)
        self._packed = self._packed_selector(packed_weights, nhwc_conv)
        self._block = self._block_selector(weights_block, nhwc_conv)
        if loop_stream is True and not use_graphs:
            raise BackendError(f"loop_stream needs the default CUDA provider with CUDA graphs (device {self.device}, "
                               f"providers {'given' if custom else 'default'}, cuda_graphs={cuda_graphs!r})")
        loops = set(LOOP_STREAMS.values())
        if loop_stream not in (None, True, False) and not set(loop_stream) <= loops:
            raise BackendError(f"loop_stream names unknown loops {sorted(set(loop_stream) - loops)}; "
                               f"loops: {sorted(loops)}")
        chosen = (frozenset() if loop_stream is False else loops if loop_stream in (None, True)
                  else frozenset(loop_stream))
        on_arena = sorted(n for n, loop in LOOP_STREAMS.items() if loop in chosen and self._on_arena(n))
        if loop_stream is True and on_arena:
            raise BackendError(f"loop_stream: {on_arena} are on the shared arena, where a run must end before the "
                               "arena's lock is released, so their steps cannot be queued; leave them off the arena "
                               "(shared_arena) or loop_stream")
        self.loop_streams = chosen if use_graphs and cuda_graphs else frozenset()  # the loops given a stream
        self._streams: dict[str, CudaStream] = {}  # LOOP_STREAMS' loop → its stream
        self._stream_lock = threading.Lock()

    @classmethod
    def for_artifacts(cls, art, device: str | Device = "cpu", **options) -> "OrtSessionFactory":
        """A factory for the sessions of an export folder (``Artifacts``): its precision, and its NHWC components
        left unpacked (``Artifacts.nhwc_components``); ``options`` as for the constructor."""
        return cls(device, precision=art.precision, needs_prepacking=art.nhwc_components,
                   disabled_optimizers=art.disabled_optimizers, **options)

    @property
    def _prefer_nhwc(self) -> frozenset:
        """The components whose provider options move their convolutions to NHWC (``prefer_nhwc``)."""
        return frozenset(name for name, opts in self.component_options.items() if int(opts.get("prefer_nhwc", 0)))

    def _packed_selector(self, packed_weights, needs_prepacking: frozenset):
        """component name → whether its session packs its weights (see ``packed_weights`` above)."""
        if packed_weights is None and not self._default_cuda:
            packed_weights = False
        if packed_weights is False:
            return lambda name: False
        if not self._default_cuda:
            raise BackendError(f"packed_weights applies to the default CUDA provider only (device {self.device})")
        nhwc = needs_prepacking | self._prefer_nhwc
        if packed_weights is None:  # the default: PACKED_WEIGHTS where they allow it
            return lambda name: name in PACKED_WEIGHTS and name not in nhwc
        if packed_weights is True:
            return lambda name: name not in nhwc
        chosen = frozenset(packed_weights)
        refused = sorted(chosen & nhwc)
        if refused:
            raise BackendError(f"packed_weights {refused}: their NHWC convolutions (NhwcConv, or prefer_nhwc) need "
                               "ONNX Runtime's prepacking, which packed weights turn off; leave them out")
        return lambda name: name in chosen

    @staticmethod
    def check_shared_arena_choice(device: Device, shared_arena, cuda_graphs=False) -> None:
        """On CUDA, sessions that capture CUDA graphs may share the arena only among ``CAPTURED_ON_ARENA_CHECKED``
        (the decode stage's; ``cuda_graphs``: the factory's choice, False where it captures none). Other captured
        ones are not checked since the fix of runs BI-BJ (the comment above ``CAPTURED_ON_ARENA_CHECKED``); a session
        that never captures allocates before it writes and frees after, as any arena user. None and False always
        pass; ``shared_arena.ALLOW_ON_CUDA`` lifts the rule for diagnosis."""
        if device.kind != "cuda" or shared_arena in (None, False) or _shared_arena_module.ALLOW_ON_CUDA:
            return
        why = ("captured sessions on ONNX Runtime's shared arena gave two runtimes of one process driven at once "
               "wrong audio (docs/benchmarks.md, runs BD-BI); since the runtime's buffers are its own there, only "
               f"the decode stage's ({', '.join(sorted(CAPTURED_ON_ARENA_CHECKED))}) are checked (runs BJ-BN)")
        if shared_arena is True:  # every session: only the decode stage's may capture
            captured = _captured_names(cuda_graphs)
            if captured is None or captured - CAPTURED_ON_ARENA_CHECKED:
                raise InvalidRequestError(f"shared_arena=True on CUDA needs every session outside the decode stage "
                                          f"uncaptured (cuda_graphs=False, or the decode stage's names only): {why}; "
                                          "or name the sessions to share it")
            return
        captures = _graph_selector(cuda_graphs)
        names = {shared_arena} if isinstance(shared_arena, str) else set(shared_arena)
        captured = sorted(n for n in names if captures(n) and n not in CAPTURED_ON_ARENA_CHECKED)
        if captured:
            raise InvalidRequestError(
                f"shared_arena {captured}: on CUDA only the decode stage's sessions may share the arena with CUDA "
                f"graphs — {why}; run these uncaptured (cuda_graphs=captured_except({captured}), or bench "
                f"--uncaptured {','.join(captured)}), or leave them off the arena")

    def _arena_selector(self, shared_arena):
        """component name → whether its session is on the shared arena (see ``shared_arena`` above)."""
        if shared_arena is False:
            return lambda name: False
        if shared_arena is True:
            return lambda name: True
        chosen = frozenset(shared_arena)
        return lambda name: name in chosen

    def on_shared_arena(self, name: str) -> bool:
        """Whether a session of ``name`` made now would be on the shared arena."""
        return self.arena is not None and self._on_arena(name) and not (self.arena.captured and not self._arena_chosen)

    def _block_selector(self, weights_block, nhwc_conv: frozenset):
        """component name → whether its weights go in a ``WeightsBlock`` (see ``weights_block`` above)."""
        if weights_block is None and not self._default_cuda:
            weights_block = False
        if weights_block is False:
            return lambda name: False
        if self.providers_given:
            raise BackendError("weights_block applies to the default CPU or CUDA provider only; providers were given")
        prefer_nhwc = self._prefer_nhwc
        if weights_block is None:  # the default: the components with NhwcConv nodes, unless packed
            return lambda name: name in nhwc_conv and name not in prefer_nhwc and not self._packed(name)
        if weights_block is True:
            return lambda name: name not in prefer_nhwc and not self._packed(name)
        chosen = frozenset(weights_block)
        refused = sorted(chosen & prefer_nhwc)
        if refused:
            raise BackendError(f"weights_block {refused}: prefer_nhwc copies their convolution weights into "
                               "allocations of ONNX Runtime's own, so the block would hold a second copy")
        refused = sorted(name for name in chosen if self._packed(name))
        if refused:
            raise BackendError(f"weights_block {refused}: their weights are packed already (packed_weights); "
                               "leave them out of one of the two")
        return lambda name: name in chosen

    def create(self, name: str, path: str | Path, graphs: bool | None = None) -> OrtSession:
        """One session; ``graphs=False`` never captures it (whatever ``cuda_graphs`` says).

        On CUDA the whole of it holds the capture guard, shared: creation allocates on the GPU (its weights block, the
        session's weights and kernels), which must not happen while another thread captures a graph; and no graph is
        captured between reading whether the shared arena has one and the session joining it (the flag is set under
        the guard, exclusive)."""
        with CUDA_CAPTURE_GUARD.shared() if self.device.kind == "cuda" else nullcontext():
            return self._create(name, path, graphs)

    def _create(self, name: str, path: str | Path, graphs: bool | None) -> OrtSession:
        opts = self.ort.SessionOptions()
        opts.graph_optimization_level = self.graph_optimization
        packed = self._packed(name)
        opts.enable_mem_pattern = self.mem_pattern or packed
        if self.optimized_cache is not None:
            cached = self.optimized_cache / f"{name}.onnx"
            if cached.exists():
                path, opts.graph_optimization_level = cached, self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            else:
                self.optimized_cache.mkdir(parents=True, exist_ok=True)
                opts.optimized_model_filepath = str(cached)
                opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                              f"{name}.onnx.data")
                opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                              "1024")
        arena = self.arena if self.arena is not None and self._on_arena(name) else None
        if arena is not None and not self.on_shared_arena(name):  # the default, after an open runtime's capture
            log.info("%s: the shared arena of %s has captured graphs already (another runtime of the process, still "
                     "open, has served); this session keeps an arena of its own (load(shared_arena=...) makes that an "
                     "error)",
                     name, self.device)
            arena = None
        if arena is not None:
            arena.check_can_join(name)  # a choice made explicitly: raises once a graph on it was captured
        config = {**(SHARED_ARENA_CONFIG if arena is not None else {}), **(PACKED_CONFIG if packed else {}),
                  **self.session_config}
        if self.disabled_optimizers.get(name):  # with any the caller's session_config disables
            given = [r for r in str(config.get(DISABLE_OPTIMIZERS_KEY, "")).split(";") if r]
            config[DISABLE_OPTIMIZERS_KEY] = ";".join(dict.fromkeys(given + list(self.disabled_optimizers[name])))
        for key, value in config.items():
            opts.add_session_config_entry(key, str(value))
        block = None
        if self._block(name):
            try:
                block = WeightsBlock(path, self.ort, self.device.index if self.device.kind == "cuda" else None)
            except (OSError, ValueError, RuntimeError) as err:
                raise BackendError(f"could not place {name}'s weights from {path} in one block: {err}") from err
            block.add_to(opts)
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        graphs = self._graphs_for(name) and graphs is not False
        base = self.providers
        if self._default_cuda:
            base = [(n, {**o, **self.component_options.get(name, {})}) for n, o in base]
        stream = (self._loop_stream(LOOP_STREAMS[name]) if LOOP_STREAMS.get(name) in self.loop_streams
                  and arena is None else None)  # (on the arena each run is waited for: no loop stream)
        if stream is not None:
            base = [(n, {**o, "user_compute_stream": str(stream.handle)}) for n, o in base]
        providers = base
        if graphs:
            providers = [(n, {**o, "enable_cuda_graph": 1}) if n == "CUDAExecutionProvider" else (n, o)
                         for n, o in providers]
        refused = ""
        try:
            try:
                session = self._open(name, path, opts, providers, graphs)
            except BackendError as err:
                if not (graphs and self._graphs_optional and _is_graph_refusal(err.__cause__)):
                    raise
                refused = str(err.__cause__)
                log.warning("%s: ONNX Runtime refused CUDA graph capture (a node runs on the CPU); running it on %s "
                            "without a graph: %s", name, self.device, err.__cause__)
                graphs, providers = False, base
                session = self._open(name, path, opts, providers, graphs)
        except BaseException:
            if block is not None:
                block.close()
            raise
        if block is not None:
            block.attach(session)
        used = session.get_providers()
        if self.device.kind == "cuda" and used[0] not in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            raise BackendError(f"{name}: asked for {self.device} but onnxruntime placed it on {used}")
        dropped = [n for n in (p[0] if isinstance(p, tuple) else p for p in providers) if n not in used]
        if dropped:  # ONNX Runtime drops a provider it cannot start (e.g. TensorRT without libnvinfer)
            raise BackendError(f"{name}: onnxruntime could not start {dropped} (running on {used}); "
                               "check that provider's libraries are installed")
        made = OrtSession(name, session, self.ort, self.device, self.bind or graphs, graphs, self.max_graphs,
                          arena=arena if self.device.kind == "cuda" else None,
                          stream=stream.retain() if stream is not None else None)
        made.stats.graph_refused = refused
        made.stats.packed_weights = packed
        made.stats.weights_block = block.nbytes if block is not None else 0
        made.stats.shared_arena = arena is not None
        made.weights_block = block
        return made

    def _loop_stream(self, loop: str) -> CudaStream:
        """The factory's one stream for ``loop``'s sessions (``LOOP_STREAMS``), made on first use."""
        with self._stream_lock:
            stream = self._streams.get(loop)
            if stream is None or stream.handle is None:  # (the last one's sessions all closed)
                try:
                    stream = self._streams[loop] = CudaStream(self.device.index)
                except RuntimeError as err:
                    raise BackendError(f"could not make the {loop} loop's CUDA stream on {self.device}: {err}") from err
            return stream

    def _open(self, name: str, path, opts, providers, graphs: bool):
        """An InferenceSession, keeping the caller's CUDA context; failures as BackendError naming the component
        (the ONNX Runtime error is its ``__cause__``). (``create`` holds the capture guard.)"""
        try:
            with caller_context_kept(self.device.kind == "cuda"):
                return self.ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as err:
            error = BackendError(f"could not load {name} from {path}"
                                 f"{' with CUDA graphs on (load with cuda_graphs=[...] without it)' if graphs else ''}"
                                 f": {err}")
            error.component = name
            raise error from err

    def create_all(self, files: dict[str, Path], workers: int = 4) -> dict[str, OrtSession]:
        """Create every session, several at a time (ONNX Runtime releases the GIL while it builds)."""
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {name: pool.submit(self.create, name, path) for name, path in files.items()}
            return {name: f.result() for name, f in futures.items()}


def _is_graph_refusal(err: Exception) -> bool:
    """ONNX Runtime's session-creation error when a graph-capture session has nodes off the CUDA EP."""
    return "graph capture" in str(err)


def _captured_names(cuda_graphs) -> frozenset | None:
    """The component names a ``cuda_graphs`` choice captures where it lists them (none for False, the named ones for a
    name or names); None where it names none but captures components, known or not: every one (True), or every one
    but ``UNCAPTURED_BY_DEFAULT``'s ("auto")."""
    if cuda_graphs is True or cuda_graphs == "auto":
        return None
    if not cuda_graphs:
        return frozenset()
    return frozenset((cuda_graphs,) if isinstance(cuda_graphs, str) else cuda_graphs)


def _graph_selector(cuda_graphs):
    """component name → whether its session captures CUDA graphs (see ``OrtSessionFactory``'s ``cuda_graphs``)."""
    if cuda_graphs == "auto":
        return lambda name: name not in UNCAPTURED_BY_DEFAULT
    captured = _captured_names(cuda_graphs)
    if captured is None:  # True
        return lambda name: True
    return lambda name: name in captured


def _check_gpu_index(ort, device: Device) -> None:
    """``cuda:7`` on a host with fewer GPUs is an error naming the GPUs present (asked of the CUDA
    driver through ctypes: no torch, and no change to the caller's current device)."""
    count = cuda_device_count()
    if count is not None and device.index >= count:
        raise BackendError(f"device {device} asked for, but this host has {count} CUDA GPU(s): "
                           f"{', '.join(f'cuda:{i}' for i in range(count)) or 'none'}")
