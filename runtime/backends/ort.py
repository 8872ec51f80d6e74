"""ONNX Runtime backend: CPU or CUDA execution provider over the exported ONNX files.

On CUDA every run goes through I/O binding: each distinct set of input shapes (a *shape key*) gets
its own device buffers, allocated once, and — with CUDA graphs on — its own captured graph
(``gpu_graph_id``). A run copies the inputs into that key's buffers, replays the graph, and copies
the outputs back. ONNX Runtime does not check that a graph id is replayed with the shapes it was
captured with; the key → id map here is what guarantees it.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BackendError, InvalidRequestError
from .base import Device
from .capture_guard import CUDA_CAPTURE_GUARD
from .cuda_driver import CudaStream, caller_context_kept, cuda_device_count
from .shared_arena import SESSION_CONFIG as SHARED_ARENA_CONFIG
from .shared_arena import SharedArena
from . import shared_arena as _shared_arena_module
from .shared_arena import shared_arena as _shared_arena
from .dlpack import own_value
from .weights_block import WeightsBlock

log = logging.getLogger("audioldm2_trt.runtime")

GRAPH_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                      "all": "ORT_ENABLE_ALL"}
# cuBLAS's workspace per handle, in KiB (CUBLAS_WORKSPACE_CONFIG=:1024:1, one 1 MiB buffer). cuBLAS's own default
# on the H100 cost about 120 MiB per ONNX Runtime session (half at creation, half on the first run; the UNet about
# 240): 5007 → 3863 MiB for the fp16 runtime after its first call with 4 MiB, with no slowdown measured
# (cold_start.py, docs/benchmarks.md, runs I and J). 1 MiB (since runs BC–BD): 66 MiB less again over the runtime's
# sessions, at the same speed and audio; 256 KiB (since run BP): 16 MiB less again at the same speed (runs BD, BP).
CUBLAS_WORKSPACE_KIB = 256
# Sessions that cuda_graphs="auto" runs without a CUDA graph: CLAP's text branch and the projection run once per
# request, so a graph saves them little (0.7-1.2 ms a request on the H200, run BP), and their captures grew the
# runtime's peak by 32 MiB at its fourth request (runs BC-BD). With the 256 KiB cuBLAS workspace this puts the fp16
# runtime's peak GPU memory under B0's: 3120 against 3126 MiB (run BP; 3150 with both captured and 1 MiB).
# cuda_graphs=True, or names, captures them too.
UNCAPTURED_BY_DEFAULT = frozenset({"clap_text", "projection"})
DEFAULT_MAX_GRAPHS = 16  # per component; shape keys beyond this run uncaptured (still bound on the device)
_NO_GRAPH = -1  # ONNX Runtime's "no capture, no replay" graph id
# ONNX Runtime runs each graph id a few times uncaptured (memory allocation) before it captures; runs of a shape
# key below this count hold the process's capture guard exclusively (capture_guard.py), later ones share it.
CAPTURE_RUNS = 4
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


# ONNX Runtime's run option that leaves the stream running when a run returns (its replay of a captured graph
# otherwise waits for the graph; measured on the H100 with onnxruntime-gpu 1.31.1: 0.025 against 1.9 ms of host
# time for a 1.9 ms graph, scripts/stream_probe.py, docs/benchmarks.md)
NO_WAIT_OPTION = "disable_synchronize_execution_providers"


@dataclass
class _Bound:
    """Device buffers (and a graph id, or -1) for one shape key."""

    binding: object
    inputs: dict
    outputs: dict
    graph_id: int
    runs: int = 0


@dataclass
class SessionStats:
    graphs: int = 0
    uncaptured_keys: int = 0
    runs: int = 0
    keys: list = field(default_factory=list)
    graph_refused: str = ""  # why ONNX Runtime refused CUDA graph capture (cuda_graphs="auto"), else ""
    packed_weights: bool = False  # its weights in one device block (OrtSessionFactory's packed_weights)
    weights_block: int = 0  # bytes of its weights in a block of the runtime's own (OrtSessionFactory's weights_block)
    shared_arena: bool = False  # its activations from the device's shared arena (OrtSessionFactory's shared_arena)


def _shape_key(feeds: dict[str, np.ndarray]) -> tuple:
    """What tells one set of input shapes (one set of device buffers, one CUDA graph) from another."""
    return tuple(sorted((k, v.shape, v.dtype.str) for k, v in feeds.items()))


class OrtSession:
    """One ``onnxruntime.InferenceSession``; errors are re-raised naming the component and shapes.

    ``run`` is thread-safe. CPU runs use ONNX Runtime's own thread-safe ``run``; bound runs share per-key
    buffers, so they take this component's lock.

    On CUDA every call into ONNX Runtime for this session happens on one worker thread of its own, whichever
    thread calls ``run``: the CUDA provider keeps its CUDA-graph state (run counts, captured graphs) and its
    stream per *thread*, so a session driven from many threads (a server's thread pool) would capture its
    graphs again in every new thread, each capture while other threads run — which CUDA forbids (seen on
    the H100, docs/benchmarks.md). The worker also leaves the caller's current CUDA device alone. Those runs
    hold the process's ``CUDA_CAPTURE_GUARD`` too: exclusively while a shape key may still be captured,
    shared afterwards, since another session's worker may capture at the same time.

    arena: the shared arena this CUDA session allocates from (``shared_arena.py``), or None for its own arena. Each
    run then also holds the arena's lock until its outputs are synchronised, and its first captured graph marks the
    arena as captured.

    stream: the ``CudaStream`` the session runs on where it was given one (``user_compute_stream``; the factory's
    ``loop_stream``), else None (ONNX Runtime's own stream per session). Only then, and never on a shared arena,
    may ``replay`` return before its graph has run (``wait=False``); the session releases the stream when it closes.
    """

    def __init__(self, name: str, session, ort, device: Device, bind: bool, cuda_graphs: bool,
                 max_graphs: int = DEFAULT_MAX_GRAPHS, arena: SharedArena | None = None,
                 stream: CudaStream | None = None):
        self.name = name
        self._session = session
        self._ort = ort
        self.device = device
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.bind = bind
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()  # stats.runs of the plain, unlocked path
        self._bound: dict[tuple, _Bound] = {}
        self._next_graph_id = 1  # 0 is reserved by ONNX Runtime
        cuda = device.kind == "cuda"
        self._guard = CUDA_CAPTURE_GUARD if cuda else None
        self._arena = arena
        self.stream = stream
        self.weights_block = None  # the WeightsBlock holding its weights (the factory sets it), closed after it
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}") if cuda else None
        self.stats = SessionStats()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            if not self.bind and self._worker is None:  # concurrent runs allowed: only the count is locked
                outputs = dict(zip(self.output_names, self._session.run(self.output_names, feeds)))
                with self._count_lock:
                    self.stats.runs += 1
                return outputs
            with self._lock:  # taken by the caller, never by the worker (see ``held``)
                if self._worker is not None:
                    return self._worker.submit(self._run_bound, feeds).result()
                return self._run_bound(feeds)
        except BackendError:
            raise
        except Exception as err:  # onnxruntime raises its own exception types; name what failed
            raise self._named(feeds, err) from err

    def start(self, feeds: dict[str, np.ndarray]):
        """``run(feeds)`` begun on this session's worker (CUDA), so that the caller can run another session while it
        runs (on their own streams the two overlap on the GPU); returns a callable that waits for it and returns its
        outputs (raising what ``run`` would). Without a worker it runs here, before returning. This session's lock is
        held from here until the run has ended, as ``run`` holds it."""
        if self._worker is None:
            outputs = self.run(feeds)
            return lambda: outputs
        self._lock.acquire()
        try:
            pending = self._worker.submit(self._run_bound, feeds)
        except BaseException:
            self._lock.release()
            raise
        pending.add_done_callback(lambda _: self._lock.release())

        def result() -> dict[str, np.ndarray]:
            try:
                return pending.result()
            except BackendError:
                raise
            except Exception as err:
                raise self._named(feeds, err) from err

        return result

    def _named(self, feeds: dict[str, np.ndarray], err: Exception) -> BackendError:
        """The BackendError for ``err`` raised by ONNX Runtime in a run on ``feeds``, naming this component and them."""
        shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in feeds.items()}
        error = BackendError(f"{self.name} failed on inputs {shapes}"
                             f"{' (CUDA graphs on)' if self.cuda_graphs else ''}: {err}")
        error.component = self.name
        return error

    # -- a sequence of bound runs that keeps its data on the device (runtime/denoising.py) -------------
    def held(self):
        """This session's lock, for a caller that drives several ``call``s over one shape key's buffers (the
        denoising loop): other threads' ``run``s wait until it is released. Not reentrant: no ``run`` inside."""
        return self._lock

    def call(self, fn, may_capture: bool = False, what: str = "a device-loop step"):
        """``fn()`` on this session's worker thread (inline without one) under the process's capture guard —
        exclusive where ``fn`` may capture a CUDA graph, shared otherwise; returns its result. The caller
        holds ``held()``. An ONNX Runtime error comes back as BackendError naming this component and ``what``."""
        def guarded():
            with self._guarded(may_capture):
                return fn()

        try:
            return guarded() if self._worker is None else self._worker.submit(guarded).result()
        except BackendError:
            raise
        except Exception as err:
            raise self.failure(what, err) from err

    def failure(self, what: str, err: Exception) -> BackendError:
        """The BackendError for ``err``, raised by ONNX Runtime while this session did ``what``."""
        error = BackendError(f"{self.name} failed in {what}{' (CUDA graphs on)' if self.cuda_graphs else ''}: {err}")
        error.component = self.name
        return error

    def key_buffers(self, feeds: dict[str, np.ndarray], bound_inputs: dict | None = None) -> "_Bound | None":
        """(inside ``call``) The device buffers of this shape key, created (one uncaptured run) if new, with
        ``feeds`` copied in; None for a key past ``max_graphs``, which has no buffers of its own.
        ``bound_inputs``: OrtValues on this device bound as these inputs as they are, never copied (another session's
        buffers: the UNet context graph's outputs, ``denoising.ContextGraph``); their shapes and types are part of the
        key, and a key keeps the OrtValues it was made with: others for it are an error."""
        if not self.bind:
            raise BackendError(f"{self.name}: buffers kept on the device need I/O binding (CUDA, or bind=True)")
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        bound_inputs = bound_inputs or {}
        key = _shape_key(feeds) + tuple(sorted((k, tuple(v.shape()), v.data_type()) for k, v in bound_inputs.items()))
        bound = self._key_bound(key, feeds, bound_inputs)
        if bound is not None and any(bound.inputs[k] is not v for k, v in bound_inputs.items()):
            raise BackendError(f"{self.name}: shape key {_shape_key(feeds)} is bound to other buffers than the ones "
                               "given for its inputs " + ", ".join(sorted(bound_inputs)))
        return bound

    def private_buffers(self, feeds: dict[str, np.ndarray]) -> _Bound:
        """(inside ``call``) Device buffers of ``feeds``' shapes that belong to the caller, not to a shape key of
        ``run``: inputs copied in, outputs sized by one uncaptured run, a CUDA graph of their own where this session
        captures (``replay(bound, updates)`` runs them, as a key's)."""
        if not self.bind:
            raise BackendError(f"{self.name}: buffers kept on the device need I/O binding (CUDA, or bind=True)")
        return self._make_bound({k: np.ascontiguousarray(v) for k, v in feeds.items()})

    def replay(self, bound: _Bound, updates: dict[str, np.ndarray], wait: bool = True) -> bool:
        """(inside ``call``, ``may_capture=may_capture(bound)``) copy ``updates`` into the key's input buffers
        and run it — its CUDA graph when captured; the outputs stay in ``bound.outputs``.
        ``wait=False``: return once the captured graph is queued on the session's ``stream``, without waiting for
        it — only where the session has a stream and the graph is captured already (else this waits as ever).
        The caller must then wait on an event recorded behind it (``stream.record`` / ``stream.wait``) before it
        reads the outputs on the host or copies into the inputs. Returns whether it waited."""
        for k, v in updates.items():
            bound.inputs[k].update_inplace(np.ascontiguousarray(v))
        return self._execute(bound, wait)

    def may_capture(self, bound: _Bound) -> bool:
        return self.cuda_graphs and bound.runs < CAPTURE_RUNS

    def value(self, array: np.ndarray):
        """(inside ``call``) An OrtValue on this session's device holding a copy of ``array``."""
        return self._ortvalue(np.ascontiguousarray(array))

    def graph_binding(self, inputs: dict, outputs: dict) -> _Bound:
        """(inside ``call``) An I/O binding of these OrtValues (by input / output name, the caller's buffers: another
        session's may be among them) with a CUDA graph of its own where this session captures: ``replay(bound, {})``
        runs it, uncaptured for its first runs, captured within ``CAPTURE_RUNS`` (hold the guard exclusively while
        ``may_capture``), replayed after. The OrtValues must outlive the binding and keep their addresses."""
        binding = self._session.io_binding()
        for k, v in inputs.items():
            binding.bind_ortvalue_input(k, v)
        for k, v in outputs.items():
            binding.bind_ortvalue_output(k, v)
        return _Bound(binding, dict(inputs), dict(outputs), self._new_graph_id())

    def _new_graph_id(self) -> int:
        """The next CUDA graph id of this session, or ``_NO_GRAPH`` where it captures none."""
        if not self.cuda_graphs:
            return _NO_GRAPH
        self._next_graph_id += 1
        self.stats.graphs += 1
        return self._next_graph_id - 1

    # -- bound runs ---------------------------------------------------------------------------------
    def _run_bound(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        key = _shape_key(feeds)
        bound = self._bound.get(key)
        with self._guarded(self.cuda_graphs and (bound is None or self.may_capture(bound))):
            return self._run_key(key, feeds)

    @contextmanager
    def _guarded(self, may_capture: bool):
        """What a run holds: the capture guard on CUDA (exclusive where it may capture), then the shared arena's lock
        where the session has one (runs on one arena never overlap)."""
        guard = nullcontext() if self._guard is None else self._guard.exclusive() if may_capture else self._guard.shared()
        with guard, self._arena.lock if self._arena is not None else nullcontext():
            yield

    def _key_bound(self, key: tuple, feeds: dict[str, np.ndarray], bound_inputs: dict | None = None) -> "_Bound | None":
        """This key's buffers with ``feeds`` copied in, created (one uncaptured run) if new; None past ``max_graphs``."""
        bound = self._bound.get(key)
        if bound is None:
            if len(self._bound) >= self.max_graphs:
                return None
            bound = self._bound[key] = self._make_bound(feeds, bound_inputs)
            self.stats.keys.append({k: list(v.shape) for k, v in feeds.items()})
        else:
            for k, v in feeds.items():
                bound.inputs[k].update_inplace(v)
        return bound

    def _run_key(self, key: tuple, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bound = self._key_bound(key, feeds)
        if bound is None:
            return self._run_transient(feeds)
        self._execute(bound)
        # On the CPU an OrtValue's numpy() is a view of the bound buffer: copy before the next run.
        copy = self.device.kind == "cpu"
        return {k: np.array(v.numpy(), copy=True) if copy else v.numpy() for k, v in bound.outputs.items()}

    def _run_options(self, graph_id: int):
        ro = self._ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", str(graph_id))
        return ro

    def _execute(self, bound: _Bound, wait: bool = True) -> bool:
        """Run ``bound``; returns whether it waited for the run (see ``replay``)."""
        ro = self._run_options(bound.graph_id) if self.cuda_graphs else None
        queue = (not wait and self.stream is not None and self._arena is None and bound.graph_id != _NO_GRAPH
                 and not self.may_capture(bound))  # (on a shared arena a run ends before its lock is released)
        if queue:
            ro.add_run_config_entry(NO_WAIT_OPTION, "1")
        self._session.run_with_iobinding(bound.binding, ro)
        if not queue:
            bound.binding.synchronize_outputs()
        bound.runs += 1
        self.stats.runs += 1
        if self._arena is not None and ro is not None and bound.graph_id != _NO_GRAPH:
            self._arena.captured = True  # (from its first graph run on: ONNX Runtime captures within CAPTURE_RUNS)
        return not queue

    def _own_buffers(self) -> bool:
        """Whether this session's new buffers come from memory of the runtime's own (``dlpack.own_value``), not
        from ONNX Runtime's Python allocator: where that allocator would take them from the shared arena."""
        return _shared_arena_module.OWN_BUFFERS and _shared_arena_module.python_values_from_arena(self.device)

    def _cuda_index(self) -> int | None:
        return self.device.index if self.device.kind == "cuda" else None

    def _ortvalue(self, array: np.ndarray):
        """An OrtValue on this session's device holding a copy of ``array``."""
        if self._own_buffers():
            return own_value(self._ort, array.shape, array.dtype, self._cuda_index(), source=array)
        if self.device.kind == "cpu":  # a CPU OrtValue wraps the array itself: never alias the caller's
            array = array.copy()
        return self._ort.OrtValue.ortvalue_from_numpy(array, self.device.kind, self.device.index)

    def _empty_value(self, shape, dtype):
        """An uninitialised OrtValue of ``shape`` and ``dtype`` on this session's device."""
        if self._own_buffers():
            return own_value(self._ort, shape, dtype, self._cuda_index())
        return self._ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device.kind, self.device.index)

    def _make_bound(self, feeds: dict[str, np.ndarray], bound_inputs: dict | None = None) -> _Bound:
        """Device buffers for this key: inputs copied in (``bound_inputs`` bound as they are), outputs sized by one
        uncaptured run."""
        inputs = {**{k: self._ortvalue(v) for k, v in feeds.items()}, **(bound_inputs or {})}
        probe = self._session.io_binding()
        for k, v in inputs.items():
            probe.bind_ortvalue_input(k, v)
        for k in self.output_names:
            probe.bind_output(k, self.device.kind, self.device.index)
        self._session.run_with_iobinding(probe, self._run_options(_NO_GRAPH) if self.cuda_graphs else None)
        probe.synchronize_outputs()
        outputs = {}
        for k, v in zip(self.output_names, probe.get_outputs()):
            dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                     "tensor(int64)": np.int64, "tensor(int32)": np.int32}[v.data_type()]
            outputs[k] = self._empty_value(v.shape(), dtype)
        binding = self._session.io_binding()
        for k, v in inputs.items():
            binding.bind_ortvalue_input(k, v)
        for k, v in outputs.items():
            binding.bind_ortvalue_output(k, v)
        bound = _Bound(binding, inputs, outputs, self._new_graph_id())
        if self.cuda_graphs:
            self._execute(bound)  # ONNX Runtime's regular run before capture; the next run captures
        return bound

    def _run_transient(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A key past ``max_graphs``: bound for this run only, never captured."""
        self.stats.uncaptured_keys += 1
        if self.stats.uncaptured_keys == 1:
            log.info("%s: more than %d input shapes; further shapes run without a CUDA graph", self.name,
                     self.max_graphs)
        binding = self._session.io_binding()
        for k, v in feeds.items():
            binding.bind_ortvalue_input(k, self._ortvalue(v))
        for k in self.output_names:
            binding.bind_output(k, self.device.kind, self.device.index)
        self._session.run_with_iobinding(binding, self._run_options(_NO_GRAPH) if self.cuda_graphs else None)
        binding.synchronize_outputs()
        self.stats.runs += 1
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        def release():
            with self._guarded(False):
                self._bound.clear()  # frees device buffers: not while another thread captures
                self._session = None

        if self._session is None:  # closed already
            return
        with self._lock:  # the caller takes the lock, never the worker (see ``held``)
            if self._worker is None:
                release()
            else:
                self._worker.submit(release).result()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        if self.stream is not None:
            self.stream, stream = None, self.stream
            stream.release()  # after the session: ONNX Runtime never destroys a stream it was given
        if self.weights_block is not None:
            self.weights_block, block = None, self.weights_block
            block.close()  # after the session: it read its weights from the block


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
    elsewhere, and where it finds the arena captured already (another runtime of the process has served) those
    sessions keep arenas of their own (logged), where a choice made explicitly raises; False = none; True = every
    component; or a collection of names. On CUDA sessions that capture CUDA graphs may be named only among the decode
    stage's (``check_shared_arena_choice``: other captured ones gave wrong audio with two runtimes at once and are not
    checked since the fix, runs BD-BN; ``shared_arena.ALLOW_ON_CUDA`` lifts that for diagnosis), any session that
    captures none; there its runs take turns, each holding the arena's lock until its outputs are synchronised, so
    they are never queued on a loop stream, and no session may join the arena after one of its graphs was captured.
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
    """

    def __init__(self, device: str | Device = "cpu", providers: list | None = None, threads: int = 0,
                 cuda_graphs="auto", bind: bool | None = None, max_graphs: int = DEFAULT_MAX_GRAPHS,
                 tf32: bool = False, component_options: dict | None = None, graph_optimization: str = "all",
                 optimized_cache: str | Path | None = None, precision: str = "fp16", session_config: dict | None = None,
                 cublas_workspace_kib: int | None = CUBLAS_WORKSPACE_KIB, shared_arena=None,
                 mem_pattern: bool | None = None, packed_weights=None, needs_prepacking=None,
                 weights_block=None, loop_stream: bool | None = None):
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
        return cls(device, precision=art.precision, needs_prepacking=art.nhwc_components, **options)

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
            if cuda_graphs is True or cuda_graphs == "auto" or (cuda_graphs and set(
                    (cuda_graphs,) if isinstance(cuda_graphs, str) else cuda_graphs) - CAPTURED_ON_ARENA_CHECKED):
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
        if arena is not None and not self.on_shared_arena(name):  # the default, after another runtime's capture
            log.info("%s: the shared arena of %s has captured graphs already (another runtime of the process has "
                     "served); this session keeps an arena of its own (load(shared_arena=...) makes that an error)",
                     name, self.device)
            arena = None
        if arena is not None:
            arena.check_can_join(name)  # a choice made explicitly: raises once a graph on it was captured
        config = {**(SHARED_ARENA_CONFIG if arena is not None else {}), **(PACKED_CONFIG if packed else {}),
                  **self.session_config}
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


def limit_cublas_workspace(kib: int | None) -> str | None:
    """Ask cuBLAS for one ``kib`` KiB workspace per handle (``CUBLAS_WORKSPACE_CONFIG=:kib:1``) unless the process
    already sets CUBLAS_WORKSPACE_CONFIG — a value there is the operator's and is kept. Set this way before the
    process's first CUDA session, as ``OrtSessionFactory`` does, it took effect (docs/benchmarks.md, run J); whether
    cuBLAS honours it for handles made after it was first used in the process is not measured. It is process-wide: a
    torch in the same process sizes its own cuBLAS workspace from it too. ``kib=None`` leaves the environment alone.
    Returns the value in effect."""
    if kib is not None:
        if isinstance(kib, bool) or not isinstance(kib, int) or kib < 1:
            raise BackendError(f"cublas_workspace_kib must be a positive integer (KiB) or None, got {kib!r}")
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = f":{kib}:1"
            log.info("CUBLAS_WORKSPACE_CONFIG=:%d:1 (one %d KiB cuBLAS workspace per handle)", kib, kib)
    return os.environ.get("CUBLAS_WORKSPACE_CONFIG")


def cuda_provider_options(device: Device, tf32: bool) -> dict:
    """Options of our default CUDA execution provider.

    use_tf32: on only where the artefacts are fp16 anyway (their fp32-kept parts — T5, the projection, the
    vocoder, CLAP's audio branch, and the VAE decoder with ``--fuse none`` — then run on TF32 tensor cores,
    10-bit mantissa like fp16, fp32's exponent range, so T5 still does not overflow); off for fp32 artefacts, which are validated against fp32 PyTorch at 1e-4.
    On the H100 the fp32 HiFi-GAN took 81 ms with TF32 off (docs/benchmarks.md); ort-cuda-facts.md
    reads 13.3 ms with ONNX Runtime's default (TF32 on).
    cudnn_conv1d_pad_to_nc1d: about 2x faster HiFi-GAN 1-D convolutions (ort-cuda-facts.md).
    kSameAsRequested: the arena grows by what is asked, not to the next power of two (peak memory
    +12 GiB with power-of-two growth on the H100, docs/benchmarks.md).
    """
    return {"device_id": device.index, "use_tf32": int(tf32), "cudnn_conv1d_pad_to_nc1d": 1,
            "arena_extend_strategy": "kSameAsRequested"}


# Per-component additions to the CUDA provider options (measured on the H100, docs/benchmarks.md, 2026-11-26).
# They were measured on fp16 artefacts (TF32 on for their fp32 parts) and apply to those only: with fp32 artefacts
# (TF32 off) prefer_nhwc made the fp32 vocoder 80 → 233 ms (15:21 UTC run), so fp32 artefacts get none of them
# (their own are below).
# unet sdpa_kernel = flash | memory-efficient | unfused (1|2|16), i.e. not cuDNN's flash attention, which ONNX
#   Runtime prefers for fp16 on Hopper: the same step (7.06 vs 7.11 ms alone, 192 vs 192 ms end to end) and the same
#   100-prompt fidelity (1.92e-3 both), but cuDNN builds its attention plans on the first run (UNet first run 4.1 s
#   vs 1.4 s; cold start 16.1 vs 11.2 s, the latter measured second in its process).
# unet, vae_decoder cudnn_conv_algo_search HEURISTIC: cuDNN's heuristics pick each convolution's algorithm instead of
#   timing every candidate on first use (EXHAUSTIVE, ONNX Runtime's default). Clean-process cold start 9.4 / 10.1 s
#   vs 11.5 / 12.1 s (first UNet step 0.6–0.8 vs 1.7–1.8 s, first VAE 0.16–0.19 vs 0.74–0.95 s), warm end to end
#   184 / 185 vs 186 / 188 ms (scripts/cold_start.py, 15:21 UTC). The vocoder keeps EXHAUSTIVE: HEURISTIC fails on
#   its dilated 1-D convolutions (CUDNN_FE HEURISTIC_QUERY_FAILED, 14:50 UTC).
# vocoder prefer_nhwc: HiFi-GAN's 1-D convolutions without the NCHW↔NHWC transposes cuDNN inserts around them
#   (fp16 9.1 → 7.5 ms, fp32 + TF32 13.4 → 10.7 ms).
# clap_features use_tf32 0: its DFT is a 1024-tap convolution whose fp32 accuracy the log-mel needs (faint bins
#   sit 100 dB under loud ones); without TF32 it is still a fraction of a millisecond.
COMPONENT_PROVIDER_OPTIONS = {"unet": {"sdpa_kernel": 1 | 2 | 16, "cudnn_conv_algo_search": "HEURISTIC"},
                              "vae_decoder": {"cudnn_conv_algo_search": "HEURISTIC"},
                              "vocoder": {"prefer_nhwc": 1},
                              "clap_features": {"use_tf32": 0}}


# fp32 artefacts (TF32 off): the vocoder's convolution algorithms chosen by cuDNN's heuristics. With the exhaustive
#   search (ONNX Runtime's default) the tiny fp32 export's vocoder, captured, failed with CUDA error 700 / 715 when its
#   batch-1 graph was replayed after batch 4 and batch 2 had been searched and captured, with two or three vocoder
#   sessions in the process (two runtimes); one session, the order 4, 2, 1, 4, no CUDA graphs and the heuristic search
#   each passed (run AU, scripts/vocoder_shapes_check.py). With the heuristic search the failing script passes and the
#   exhaustive one still fails in the same run; at full size neither failed, the fp32 export validates, and the
#   vocoder takes 41 instead of 81 ms a request (run AV, docs/benchmarks.md). Why the exhaustive search fails is not
#   known. (The fp16 vocoder keeps it: the heuristic query fails on its fp16 dilated convolutions, see above.)
FP32_COMPONENT_PROVIDER_OPTIONS = {"vocoder": {"cudnn_conv_algo_search": "HEURISTIC"}}


def default_component_options(precision: str) -> dict:
    """The per-component defaults for artefacts of this precision: ``COMPONENT_PROVIDER_OPTIONS`` for fp16,
    ``FP32_COMPONENT_PROVIDER_OPTIONS`` for fp32 (see above)."""
    return COMPONENT_PROVIDER_OPTIONS if precision == "fp16" else FP32_COMPONENT_PROVIDER_OPTIONS


def merge_component_options(defaults: dict, given: dict) -> dict:
    """{component: {option: value}}: ``given`` over ``defaults``, option by option. Values must be str/int/float
    (ONNX Runtime passes provider options as strings)."""
    merged = {name: dict(opts) for name, opts in defaults.items()}
    for name, opts in given.items():
        if not isinstance(opts, dict):
            raise BackendError(f"provider options for {name!r} must be a dict of option → value, got {opts!r}")
        for key, value in opts.items():
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise BackendError(f"provider option {name}.{key} = {value!r}: use a str, int or float")
        merged[name] = {**merged.get(name, {}), **opts}
    return merged


def default_mem_pattern(device: Device) -> bool:
    """ONNX Runtime's memory pattern: off on CUDA (captured graphs do not allocate; the arena reuses blocks better
    without it), on on the CPU (see ``OrtSessionFactory``)."""
    return device.kind != "cuda"


def default_tf32(precision: str) -> bool:
    """TF32 for the fp32 parts of fp16 artefacts only (see ``cuda_provider_options``)."""
    return precision == "fp16"


def _is_graph_refusal(err: Exception) -> bool:
    """ONNX Runtime's session-creation error when a graph-capture session has nodes off the CUDA EP."""
    return "graph capture" in str(err)


def _graph_selector(cuda_graphs):
    """component name → whether its session captures CUDA graphs (see ``OrtSessionFactory``'s ``cuda_graphs``)."""
    if cuda_graphs == "auto":
        return lambda name: name not in UNCAPTURED_BY_DEFAULT
    if cuda_graphs is True:
        return lambda name: True
    if not cuda_graphs:
        return lambda name: False
    chosen = frozenset((cuda_graphs,) if isinstance(cuda_graphs, str) else cuda_graphs)  # one name, or names
    return lambda name: name in chosen


def _check_gpu_index(ort, device: Device) -> None:
    """``cuda:7`` on a host with fewer GPUs is an error naming the GPUs present (asked of the CUDA
    driver through ctypes: no torch, and no change to the caller's current device)."""
    count = cuda_device_count()
    if count is not None and device.index >= count:
        raise BackendError(f"device {device} asked for, but this host has {count} CUDA GPU(s): "
                           f"{', '.join(f'cuda:{i}' for i in range(count)) or 'none'}")


def ort_tensorrt_providers(folder: Path, device: Device, precision: str) -> list:
    """ONNX Runtime's TensorRT provider over the artefacts' ONNX files, CUDA for what TensorRT does not take;
    engines and timing cache kept in ``folder/ort_trt_cache``."""
    cache = str(Path(folder) / "ort_trt_cache")
    return [
        ("TensorrtExecutionProvider", {"device_id": device.index, "trt_fp16_enable": precision == "fp16",
                                       "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                       "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}),
        ("CUDAExecutionProvider", {"device_id": device.index, "use_tf32": 0, "cudnn_conv1d_pad_to_nc1d": 1}),
    ]
