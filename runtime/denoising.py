"""One denoising step over the live rows of a batch: UNet → classifier-free guidance → solver update.

Two steppers with one interface, chosen by the pipeline:

- ``HostStepper`` (any backend): the UNet's inputs go in and its output comes back every step; guidance
  and the update run in numpy (``Plan.update``, float64).
- ``DeviceStepper`` (ONNX Runtime with I/O binding: CUDA, or the CPU in tests): latents never leave the
  device between steps. The UNet's output buffer feeds the solver-step graph (``runtime/graphs/
  solver_step.onnx``, float32), which writes the UNet's next ``sample`` and ``timestep`` in place and reads its
  coefficients from the plan's tables, loaded once per loop; per step nothing goes in and one float per row
  (``row_check``: NaN for a non-finite row) comes back — on CUDA one step late, the next step queued already.
  The solver step's buffers belong to the UNet's shape key and live as long as the runtime
  (``SolverBuffers``), so that on CUDA the solver step is a captured graph too. It holds the UNet session
  (``OrtSession.held``) from ``open`` to ``close``: another thread's run would overwrite the conditioning,
  latents and solver state kept in that shape key's buffers.

With a context graph (the fused UNet's text-only work, export/hoist_context.py) the conditioning feeds go through
``ContextGraph`` first: once per loop, not once per step; on the device its outputs are the UNet's input buffers.

Rows: ``x`` and ``prev_x0`` are float32 [R, C, F, M] for the R real rows (the live items' rows in order);
the UNet runs ``batch_bucket(R)`` of them (padding repeats the last row), doubled under CFG as
[rows; rows] against conditioning laid out [negatives; positives].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends.base import queued_together, settle, shared_stream
from .errors import BackendError
from .schedulers import Plan


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x [n, ...] → [rows, ...], the last row repeated (a real row: no all-masked attention, no NaN)."""
    n = len(x)
    return x if n == rows else np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)])


def _shapes(feeds: dict) -> dict:
    return {k: tuple(v.shape) for k, v in feeds.items()}


def _holding(unet, make):
    """``make()`` with the UNet session's lock taken: (its result, the lock, still held until the caller's ``close``),
    or (None, None) with the lock released where ``make`` returned None; released too where it raised."""
    lock = unet.held()
    lock.acquire()
    try:
        made = make()
    except BaseException:
        lock.release()
        raise
    if made is None:
        lock.release()
        return None, None
    return made, lock


class HostStepper:
    """The UNet's noise prediction back on the host at every step; guidance and update in numpy.

    With a context graph (``ContextGraph``) and a UNet session that binds (CUDA), the loop holds the UNet from ``open``
    to ``close``, as DeviceStepper does, and the context graph's outputs stay in the UNet's input buffers: per step
    only the sample and the timestep are copied in (else the 65 outputs of the full-size UNet's context graph would
    be, at every step: on the H100 8.5 ms a step that way, run AO, and 6.5–7.1 ms this way, runs AP–AQ).
    Elsewhere every step's feeds are copied."""

    def __init__(self, unet, feeds: dict, guidance: np.ndarray, padded: int, cfg: bool, x: np.ndarray,
                 prev_x0: np.ndarray | None):
        self._unet, self._feeds, self._guidance = unet, feeds, guidance
        self._padded, self._cfg = padded, cfg
        self.x, self.prev_x0 = x, prev_x0
        self._bound, self._lock = None, None

    @classmethod
    def open(cls, unet, feeds: dict, guidance: np.ndarray, padded: int, cfg: bool, x: np.ndarray,
             prev_x0: np.ndarray | None, context: "ContextGraph | None" = None) -> "HostStepper":
        """``feeds``: the conditioning feeds; with a ``context`` graph it runs here, once."""
        stepper = cls(unet, feeds, guidance, padded, cfg, x, prev_x0)
        if context is None:
            return stepper
        if getattr(unet, "bind", False):
            stepper._bound, stepper._lock = _holding(
                unet, lambda: unet_key_buffers(unet, feeds, stepper._unet_inputs(0), context))
            if stepper._bound is not None:
                return stepper
        stepper._feeds = context.host_feeds(feeds)
        return stepper

    def _unet_inputs(self, t: int) -> dict:
        sample = pad_rows(self.x, self._padded)
        return {"sample": np.concatenate([sample, sample]) if self._cfg else sample,
                "timestep": np.array([t], dtype=np.int64)}

    def _noise(self, i: int, t: int) -> np.ndarray:
        unet, inputs = self._unet, self._unet_inputs(t)
        if self._bound is None:
            return unet.run({**self._feeds, **inputs})["noise_pred"]
        bound = self._bound

        def replay():
            unet.replay(bound, inputs)
            return np.array(bound.outputs["noise_pred"].numpy(), copy=True)

        return unet.call(replay, may_capture=unet.may_capture(bound), what=f"denoising step {i}")

    def step(self, i: int, t: int, plan: Plan) -> np.ndarray:
        """Step i at timestep t; returns bool [R]: which rows' guided noise was finite."""
        real = len(self.x)
        eps = self._noise(i, t)
        if self._cfg:
            uncond, text = np.split(eps, 2)
            eps = uncond[:real] + self._guidance * (text[:real] - uncond[:real])
        else:
            eps = eps[:real]
        self.x, self.prev_x0 = plan.update(i, eps, self.x, self.prev_x0)
        return np.isfinite(eps).all(axis=(1, 2, 3))

    def run(self, plan: Plan, start: int, after_step) -> int:
        """Steps ``start``, ``start`` + 1, … of ``plan`` until ``after_step(i, finite)`` returns False (the live rows
        change) or the plan ends; returns the next step's index. ``finite``: bool [R], which rows' guided noise was
        finite at step i."""
        i = start
        while i < len(plan.timesteps):
            finite = self.step(i, int(plan.timesteps[i]), plan)
            i += 1
            if not after_step(i - 1, finite):
                break
        return i

    def read(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(x, prev_x0) of the R rows now."""
        return self.x, self.prev_x0

    def close(self) -> None:
        """Lets other threads run the UNet again, where this loop held it."""
        if self._lock is not None:
            self._bound = None
            self._lock.release()
            self._lock = None


@dataclass
class SolverBuffers:
    """The solver step's device buffers for one UNet shape key, kept as long as the runtime: its two bindings (one
    reads the (x, prev_x0, step) triple the other writes) then keep their addresses, so the solver step runs as a
    CUDA graph of its own, as the UNet does (full size on the H100, run AG: 0.10 instead of 0.34 ms a step, 170
    instead of 176 ms a request; docs/benchmarks.md).

    xs, prevs          float32 [P, C, F, M] × 2   the state, read from pair a and written to pair 1 - a at each step
    steps              int64 [1] × 2              the step counter, read from a, advanced into 1 - a
    guidance           float32 [P, 1, 1, 1]
    coefficient_table  float32 [S, 5]             the plan's coefficients (``Plan.coefficient_table``)
    timestep_table     int64 [S + 1]              its timesteps (``Plan.timestep_table``): binding a writes the next
                                                  one into the UNet's ``timestep`` input
    row_checks         float32 [P] × 2            binding a's: NaN where a row's guided noise was not finite
    bindings           two ``graph_binding``s of the solver-step session, a = 0 and a = 1
    events             two events of the loop's stream, one recorded behind each binding's step (None without one)
    S (``capacity``) is the scheduler's ``num_train_timesteps``, more than any plan's steps.
    """

    unet_key: object  # the UNet's buffers (``_Bound``) these belong to
    xs: list
    prevs: list
    steps: list
    guidance: object
    coefficient_table: object
    timestep_table: object
    row_checks: list
    bindings: list
    events: list | None
    loaded: object = None  # the plan whose coefficient and timestep tables are in (plans are shared: ``Plans``)

    @classmethod
    def allocate(cls, solver, unet_key, rows: int, shape: tuple, capacity: int, stream=None) -> "SolverBuffers":
        """(inside the UNet's ``call``) Zeroed buffers for ``rows`` padded rows of latents ``shape`` [C, F, M] and
        plans of up to ``capacity`` steps; ``stream``: the loop's ``CudaStream``, if the UNet and solver share one."""
        zeros = lambda *dims, dtype=np.float32: solver.value(np.zeros(dims, dtype))  # noqa: E731
        pair = lambda *dims, dtype=np.float32: [zeros(*dims, dtype=dtype), zeros(*dims, dtype=dtype)]  # noqa: E731
        xs, prevs, steps, row_checks = pair(rows, *shape), pair(rows, *shape), pair(1, dtype=np.int64), pair(rows)
        guidance, coefficient_table = zeros(rows, 1, 1, 1), zeros(capacity, 5)
        timestep_table = zeros(capacity + 1, dtype=np.int64)
        common_in = {"noise_pred": unet_key.outputs["noise_pred"], "guidance": guidance,
                     "coefficient_table": coefficient_table, "timestep_table": timestep_table}
        common_out = {"sample_next": unet_key.inputs["sample"], "timestep_next": unet_key.inputs["timestep"]}
        bindings = [solver.graph_binding({**common_in, "x": xs[a], "prev_x0": prevs[a], "step": steps[a]},
                                         {**common_out, "x_next": xs[1 - a], "x0": prevs[1 - a],
                                          "step_next": steps[1 - a], "row_check": row_checks[a]}) for a in (0, 1)]
        events = [stream.event(), stream.event()] if stream is not None else None
        return cls(unet_key, xs, prevs, steps, guidance, coefficient_table, timestep_table, row_checks, bindings,
                   events)

    @property
    def capacity(self) -> int:
        return self.coefficient_table.shape()[0]

    def load_plan(self, plan: Plan, start: int, pair: int) -> None:
        """(inside the UNet's ``call``, nothing queued) The plan's tables (copied in unless this plan's are there
        already: the solver step only reads them), step ``start`` as the counter of ``pair`` and its timestep as the
        UNet's."""
        if self.loaded is not plan:
            self.loaded = None  # until both tables are in
            self.coefficient_table.update_inplace(plan.coefficient_table(self.capacity))
            self.timestep_table.update_inplace(plan.timestep_table(self.capacity))
            self.loaded = plan
        self.steps[pair].update_inplace(np.array([start], np.int64))
        self.unet_key.inputs["timestep"].update_inplace(np.array([plan.timesteps[start]], np.int64))


class ContextGraph:
    """The UNet's context graph: the work of the UNet that depends on the text conditioning alone (the cross-attention
    K/V projections, the T5 mask as an attention bias), cut out of the fused UNet at export (export/hoist_context.py)
    and run once per denoising loop instead of at every step.

    session: the context graph's session; entry: the UNet's manifest "context" ({"inputs": the conditioning feeds it
    reads, "outputs", "step_inputs": the UNet step graph's inputs}); max_shapes: text shapes given device buffers of
    their own (``device_feeds``; the UNet's ``max_graphs``)."""

    def __init__(self, session, entry: dict, max_shapes: int):
        self.session = session
        self.inputs = list(entry["inputs"])
        self.step_inputs = frozenset(entry["step_inputs"])
        self._max_shapes = max_shapes
        self._buffers: dict = {}  # text shape key → the session's private buffers (used under the UNet's lock only)

    @classmethod
    def of_component(cls, factory, art, name: str) -> "ContextGraph | None":
        """Component ``name``'s context graph in artefacts ``art``, its session made by ``factory``
        (``OrtSessionFactory``), for ``host_feeds`` (one shape of device buffers); None where it has none."""
        entry = art.context(name)
        if entry is None:
            return None
        return cls(factory.create(f"{name}_context", art.context_file(name)), entry, 1)

    def host_feeds(self, feeds: dict) -> dict:
        """The UNet step graph's conditioning feeds as host arrays: the context graph's outputs (one run) and the
        feeds the step graph reads itself."""
        made = self.session.run({k: feeds[k] for k in self.inputs})
        return {**{k: v for k, v in feeds.items() if k in self.step_inputs}, **made}

    def device_feeds(self, feeds: dict, wait: bool = True) -> "tuple[dict, dict] | None":
        """(the conditioning feeds the step graph reads itself, the context graph's outputs as OrtValues on the device)
        after one run of the context graph into the buffers kept for these text shapes (a CUDA graph of their own);
        None for a shape past ``max_shapes``. Call with the UNet's lock held: every loop of these shapes shares them.
        ``wait=False``: once its graph is captured, the run is only queued on the session's stream (``replay``), for
        a caller whose every use of the outputs is queued behind it on that stream (the UNet's, ``queued_together``)
        and who waits for that stream before these shapes' inputs are written again (the next loop's steps are)."""
        text = {k: np.ascontiguousarray(feeds[k]) for k in self.inputs}
        key = tuple(sorted((k, v.shape, v.dtype.str) for k, v in text.items()))
        session = self.session
        with session.held():
            bound = self._buffers.get(key)
            if bound is None:
                if len(self._buffers) >= self._max_shapes:
                    return None
                bound = self._buffers[key] = session.call(lambda: session.private_buffers(text),
                                                          may_capture=session.cuda_graphs,
                                                          what=f"creating the buffers of shapes {_shapes(text)}")
            session.call(lambda: session.replay(bound, text, wait=wait), may_capture=session.may_capture(bound),
                         what=f"the context graph on shapes {_shapes(text)}")
        return {k: v for k, v in feeds.items() if k in self.step_inputs}, bound.outputs

    def close(self) -> None:
        self._buffers.clear()


def unet_key_buffers(unet, feeds: dict, unet_inputs: dict, context: ContextGraph | None = None):
    """(holding the UNet) The UNet's buffers of this shape key with the conditioning ``feeds`` and ``unet_inputs``
    (sample, timestep) copied in — with a ``context`` graph, its outputs (one run) bound as the UNet's inputs in place
    of the conditioning they replace; None where the UNet or the context graph has no buffers for these shapes
    (past ``max_graphs``)."""
    bound_inputs = {}
    queued = context is not None and queued_together(context.session, unet)
    if context is not None:
        # queued: the context graph's run is not waited for (~0.3 ms of GPU at full size); the UNet's steps run
        # behind it on the same stream while the host copies the loop's inputs in
        made = context.device_feeds(feeds, wait=not queued)
        if made is None:
            return None
        feeds, bound_inputs = made
    first = {**feeds, **unet_inputs}
    try:
        return unet.call(lambda: unet.key_buffers(first, bound_inputs), may_capture=unet.cuda_graphs,
                         what=f"creating the buffers of shape key {_shapes(first)}")
    except BaseException:
        settle(shared_stream(context.session, unet) if queued else None)  # the context run out before a retry
        raise


class DeviceStepper:
    """The loop's state in device buffers: the UNet shape key's ``sample`` / ``noise_pred`` and that key's
    ``SolverBuffers`` (from ``cache``, the runtime's: one per UNet shape key, made on first use).

    Where the UNet and the solver step run on one stream (``OrtSession.stream``: the factory's ``loop_stream``, CUDA)
    and their graphs are captured, the steps are queued: step i + 1 goes onto the stream before step i's finiteness
    flags are read (after an event recorded behind it), so the GPU does not wait for the host between steps; the
    flags, the progress callback and cancellation then act one step late, and a loop stopped after step i drops
    step i + 1 (its writes go to the pair that held step i - 1's state: step i's is intact). Elsewhere each step is
    waited for before the next."""

    @classmethod
    def open(cls, unet, solver, feeds: dict, guidance: np.ndarray, padded: int, cfg: bool, x: np.ndarray,
             prev_x0: np.ndarray | None, first_t: int, cache: dict, capacity: int,
             context: ContextGraph | None = None) -> "DeviceStepper | None":
        """Holds the UNet session from here to ``close``; None (and nothing held) when the UNet (or its context
        graph) has no buffers for this shape key (more than ``max_graphs`` shapes): use a HostStepper then.
        ``feeds``: the conditioning feeds; with a ``context`` graph it runs here, its outputs bound as the UNet's.
        ``capacity``: the most steps a plan may have (the solver's tables)."""
        def made():
            stepper = cls(unet, solver, feeds, guidance, padded, cfg, x, prev_x0, first_t, cache, capacity, context)
            return stepper if stepper._bound is not None else None

        stepper, lock = _holding(unet, made)
        if stepper is not None:
            stepper._lock = lock
        return stepper

    def __init__(self, unet, solver, feeds, guidance, padded, cfg, x, prev_x0, first_t, cache, capacity,
                 context=None):
        self._unet, self._solver, self._real = unet, solver, len(x)
        self._lock = None
        self._stream = shared_stream(unet, solver)
        xp = pad_rows(x, padded)
        prev = pad_rows(prev_x0, padded) if prev_x0 is not None else np.zeros_like(xp)
        sample = np.concatenate([xp, xp]) if cfg else xp
        self._bound = unet_key_buffers(unet, feeds, {"sample": sample, "timestep": np.array([first_t], dtype=np.int64)},
                                       context)
        if self._bound is None:
            return
        self._current = 0  # which (x, prev_x0, step) triple holds the state now
        self._planned = None  # the plan this loop started (its step counter set: ``SolverBuffers.load_plan``)
        try:
            self._buffers = unet.call(lambda: self._load(cache, xp, prev, pad_rows(guidance, padded), capacity),
                                      what="loading the solver step's buffers")
        except BaseException:
            settle(getattr(unet, "stream", None))  # the context graph's run may still be queued (unet_key_buffers)
            raise

    def _load(self, cache: dict, xp, prev, guidance, capacity: int) -> SolverBuffers:
        """This UNet key's solver buffers (made on first use) with the loop's starting state copied in."""
        buffers = cache.get(id(self._bound))
        if buffers is None or buffers.unet_key is not self._bound:
            buffers = cache[id(self._bound)] = SolverBuffers.allocate(self._solver, self._bound, len(xp), xp.shape[1:],
                                                                      capacity, self._stream)
        buffers.xs[0].update_inplace(np.ascontiguousarray(xp))
        buffers.prevs[0].update_inplace(np.ascontiguousarray(prev))
        buffers.guidance.update_inplace(np.ascontiguousarray(guidance))
        return buffers

    def run(self, plan: Plan, start: int, after_step) -> int:
        """As ``HostStepper.run``, with the steps on the UNet's worker thread: one hand-off there and back for all
        the steps that capture no CUDA graph, one per step while one may (those hold the capture guard exclusively
        and are waited for one by one). ``after_step`` runs on that thread too, between steps; an exception it raises
        comes back as it is. (A hand-off a step cost 0.14 ms of host time each, 4 ms a request, on the H100: run AH,
        docs/benchmarks.md.)"""
        i, stopped = start, False
        while i < len(plan.timesteps) and not stopped:
            capturing = self._may_capture()
            i, stopped, raised = self._unet.call(lambda first=i: self._steps(plan, first, after_step, capturing),
                                                 may_capture=capturing, what=f"denoising from step {i} on the device")
            if raised is not None:
                raise raised
        return i

    def _may_capture(self) -> bool:
        """Whether a step's UNet replay or either solver binding may still capture a CUDA graph (the two bindings'
        run counts drift apart: each loop starts on the first, so loops of odd length run it once more)."""
        return (self._unet.may_capture(self._bound)
                or any(self._solver.may_capture(binding) for binding in self._buffers.bindings))

    def _steps(self, plan: Plan, first: int, after_step, only_one: bool):
        """(inside the UNet's ``call``) Steps from ``first`` until ``after_step`` says stop or the plan ends (or
        after one step, waited for, if ``only_one``); returns (the next step, whether ``after_step`` said stop,
        what it raised). Nothing of it is left on the stream when it returns."""
        if self._planned is not plan:
            self._buffers.load_plan(plan, first, self._current)
            self._planned = plan
        last = first + 1 if only_one else len(plan.timesteps)
        ahead = self._stream is not None and not only_one  # queue step i + 1 before reading step i's flags
        pending = None  # (ahead) the step queued before, its flags not read yet
        try:
            for i in range(first, last):
                queued = self._queue_step(i, wait=not ahead)
                if pending is not None:
                    stop, raised = self._report(pending, after_step)
                    if stop:
                        self._drop(queued)
                        return i, True, raised
                if ahead:
                    pending = queued
                    continue
                stop, raised = self._report(queued, after_step)
                if stop:
                    return i + 1, True, raised
            if pending is not None:
                stop, raised = self._report(pending, after_step)
                return last, stop, raised
            return last, False, None
        except BaseException:
            settle(self._stream)
            raise

    def _queue_step(self, i: int, wait: bool) -> tuple[int, int]:
        """(inside the UNet's ``call``) Step i — the UNet's replay, then the solver step, which writes the next
        sample, timestep and counter — queued on the stream (waited for where ``wait`` or where it cannot queue);
        returns (i, the pair it read). An ONNX Runtime error names the step."""
        a = self._current
        try:
            self._unet.replay(self._bound, {}, wait=wait)
            self._solver.replay(self._buffers.bindings[a], {}, wait=wait)
            if self._stream is not None:
                self._stream.record(self._buffers.events[a])
        except BackendError:
            raise
        except Exception as err:
            raise self._unet.failure(f"denoising step {i} (UNet, then the solver step) on the device", err) from err
        self._current = 1 - a
        return i, a

    def _report(self, queued: tuple[int, int], after_step) -> tuple[bool, BaseException | None]:
        """Wait for a queued step, read its rows' finiteness and call ``after_step`` with it; returns (stop, what
        ``after_step`` raised)."""
        i, a = queued
        try:
            if self._stream is not None:
                self._stream.wait(self._buffers.events[a])
            check = np.array(self._buffers.row_checks[a].numpy(), copy=True)
        except Exception as err:
            raise self._unet.failure(f"denoising step {i} (UNet, then the solver step) on the device", err) from err
        try:
            go_on = after_step(i, np.isfinite(check[: self._real]))
        except BaseException as err:  # the caller's (a progress callback's), not the backend's
            return True, err
        return not go_on, None

    def _drop(self, queued: tuple[int, int]) -> None:
        """A queued step whose results are not wanted: wait for it; the state stays the one it read."""
        i, a = queued
        if self._stream is not None:
            self._stream.wait(self._buffers.events[a])
        self._current = a

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, prev_x0) of the R rows now, copied to the host."""
        a, buffers = self._current, self._buffers
        return self._unet.call(lambda: (np.array(buffers.xs[a].numpy()[: self._real], copy=True),
                                        np.array(buffers.prevs[a].numpy()[: self._real], copy=True)))

    def close(self) -> None:
        """Lets other threads run the UNet again (its buffers and the solver's stay, for the next loop)."""
        if self._lock is None:
            return
        self._buffers = None
        self._lock.release()
        self._lock = None
