"""One denoising step over the live rows of a batch: UNet → classifier-free guidance → solver update.

Two steppers with one interface, chosen by the pipeline:

- ``HostStepper`` (any backend): the UNet's inputs go in and its output comes back every step; guidance
  and the update run in numpy (``Plan.update``, float64).
- ``DeviceStepper`` (ONNX Runtime with I/O binding: CUDA, or the CPU in tests): latents never leave the
  device between steps. The UNet's output buffer feeds the solver-step graph (``runtime/graphs/
  solver_step.onnx``, float32), which writes the UNet's next ``sample`` in place; per step only the
  timestep and 5 coefficients go in and one float per row (``row_check``: NaN for a non-finite row) comes
  back. It holds the UNet session (``OrtSession.held``) from ``open`` to ``close``: another thread's run
  would overwrite the conditioning and latents kept in that shape key's buffers.

Rows: ``x`` and ``prev_x0`` are float32 [R, C, F, M] for the R real rows (the live items' rows in order);
the UNet runs ``batch_bucket(R)`` of them (padding repeats the last row), doubled under CFG as
[rows; rows] against conditioning laid out [negatives; positives].
"""

from __future__ import annotations

import numpy as np

from .schedulers import Plan


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x [n, ...] → [rows, ...], the last row repeated (a real row: no all-masked attention, no NaN)."""
    n = len(x)
    return x if n == rows else np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)])


def _shapes(feeds: dict) -> dict:
    return {k: tuple(v.shape) for k, v in feeds.items()}


class HostStepper:
    """The UNet run with host arrays; guidance and update in numpy."""

    def __init__(self, unet, feeds: dict, guidance: np.ndarray, padded: int, cfg: bool, x: np.ndarray,
                 prev_x0: np.ndarray | None):
        self._unet, self._feeds, self._guidance = unet, feeds, guidance
        self._padded, self._cfg = padded, cfg
        self.x, self.prev_x0 = x, prev_x0

    def step(self, i: int, t: int, plan: Plan) -> np.ndarray:
        """Step i at timestep t; returns bool [R]: which rows' guided noise was finite."""
        real = len(self.x)
        sample = pad_rows(self.x, self._padded)
        if self._cfg:
            sample = np.concatenate([sample, sample])
        eps = self._unet.run({**self._feeds, "sample": sample, "timestep": np.array([t], dtype=np.int64)})["noise_pred"]
        if self._cfg:
            uncond, text = np.split(eps, 2)
            eps = uncond[:real] + self._guidance * (text[:real] - uncond[:real])
        else:
            eps = eps[:real]
        self.x, self.prev_x0 = plan.update(i, eps, self.x, self.prev_x0)
        return np.isfinite(eps).all(axis=(1, 2, 3))

    def read(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(x, prev_x0) of the R rows now."""
        return self.x, self.prev_x0

    def close(self) -> None:
        pass


class DeviceStepper:
    """The loop's state in device buffers: the UNet shape key's ``sample`` / ``noise_pred`` and two pairs of
    (x, prev_x0) buffers the solver-step graph reads from and writes to in turn."""

    @classmethod
    def open(cls, unet, solver, feeds: dict, guidance: np.ndarray, padded: int, cfg: bool, x: np.ndarray,
             prev_x0: np.ndarray | None, first_t: int) -> "DeviceStepper | None":
        """Holds the UNet session from here to ``close``; None (and nothing held) when the UNet has no
        buffers for this shape key (more than ``max_graphs`` shapes): use a HostStepper then."""
        lock = unet.held()
        lock.acquire()
        try:
            stepper = cls(unet, solver, feeds, guidance, padded, cfg, x, prev_x0, first_t)
        except BaseException:
            lock.release()
            raise
        if stepper._bound is None:
            lock.release()
            return None
        stepper._lock = lock
        return stepper

    def __init__(self, unet, solver, feeds, guidance, padded, cfg, x, prev_x0, first_t):
        self._unet, self._solver, self._real = unet, solver, len(x)
        self._lock = None
        xp = pad_rows(x, padded)
        prev = pad_rows(prev_x0, padded) if prev_x0 is not None else np.zeros_like(xp)
        sample = np.concatenate([xp, xp]) if cfg else xp
        unet_feeds = {**feeds, "sample": sample, "timestep": np.array([first_t], dtype=np.int64)}
        self._bound = unet.call(lambda: unet.key_buffers(unet_feeds), may_capture=unet.cuda_graphs,
                                what=f"creating the buffers of shape key {_shapes(unet_feeds)}")
        if self._bound is None:
            return
        self._current = 0  # which (x, prev_x0) pair holds the state now
        self._buffers = unet.call(lambda: self._allocate(xp, prev, pad_rows(guidance, padded)),
                                  what="allocating the solver step's buffers")

    def _allocate(self, xp, prev, guidance):
        solver = self._solver
        xs = [solver.value(xp), solver.value(np.zeros_like(xp))]
        prevs = [solver.value(prev), solver.value(np.zeros_like(prev))]
        self._coefficients = solver.value(np.zeros(5, np.float32))
        self._row_check = solver.value(np.zeros(len(xp), np.float32))
        common_in = {"noise_pred": self._bound.outputs["noise_pred"], "guidance": solver.value(guidance),
                     "coefficients": self._coefficients}
        common_out = {"sample_next": self._bound.inputs["sample"], "row_check": self._row_check}
        self._bindings = [solver.binding({**common_in, "x": xs[a], "prev_x0": prevs[a]},
                                         {**common_out, "x_next": xs[1 - a], "x0": prevs[1 - a]}) for a in (0, 1)]
        return xs, prevs, common_in

    def step(self, i: int, t: int, plan: Plan) -> np.ndarray:
        """Step i at timestep t; returns bool [R]: which rows' guided noise was finite."""
        timestep, coefficients = np.array([t], dtype=np.int64), plan.coefficients(i)

        def on_device():
            self._unet.replay(self._bound, {"timestep": timestep})
            self._coefficients.update_inplace(coefficients)
            self._solver.run_binding(self._bindings[self._current])
            self._current = 1 - self._current
            return np.array(self._row_check.numpy(), copy=True)

        check = self._unet.call(on_device, may_capture=self._unet.may_capture(self._bound),
                                what=f"denoising step {i} (UNet, then the solver step) on the device")
        return np.isfinite(check[: self._real])

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, prev_x0) of the R rows now, copied to the host."""
        xs, prevs, _ = self._buffers
        a = self._current
        return self._unet.call(lambda: (np.array(xs[a].numpy()[: self._real], copy=True),
                                        np.array(prevs[a].numpy()[: self._real], copy=True)))

    def close(self) -> None:
        """Frees the buffers of this loop (not the UNet's) and lets other threads run the UNet again."""
        if self._lock is None:
            return
        try:
            def release():
                self._buffers = self._bindings = self._coefficients = self._row_check = None

            self._unet.call(release)
        finally:
            self._lock.release()
            self._lock = None
