"""One component's ONNX Runtime session and how it runs (``OrtSession``).

On CUDA every run goes through I/O binding: each distinct set of input shapes (a *shape key*) gets
its own device buffers, allocated once, and — with CUDA graphs on — its own captured graph
(``gpu_graph_id``). A run copies the inputs into that key's buffers, replays the graph, and copies
the outputs back. ONNX Runtime does not check that a graph id is replayed with the shapes it was
captured with; the key → id map here is what guarantees it.

Sessions are made by ``OrtSessionFactory`` (``ort.py``), which chooses each one's provider options, CUDA
graphs, arena, stream and weights placement; this module runs them.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np

from ..errors import BackendError
from .base import Device
from .capture_guard import CUDA_CAPTURE_GUARD
from .cuda_driver import CudaStream
from . import shared_arena as _shared_arena_module
from .shared_arena import SharedArena
from .dlpack import own_value

log = logging.getLogger("audioldm2_trt.runtime")

DEFAULT_MAX_GRAPHS = 16  # per component; shape keys beyond this run uncaptured (still bound on the device)
_NO_GRAPH = -1  # ONNX Runtime's "no capture, no replay" graph id
# ONNX Runtime runs each graph id a few times uncaptured (memory allocation) before it captures; runs of a shape
# key below this count hold the process's capture guard exclusively (capture_guard.py), later ones share it.
CAPTURE_RUNS = 4

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
    arena as captured until the session closes.

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
            self._arena.mark_captured(self)  # (from its first graph run on: ONNX Runtime captures within CAPTURE_RUNS)
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
                if self._arena is not None:
                    self._arena.release(self)  # its graphs are gone: sessions may join the arena again

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
