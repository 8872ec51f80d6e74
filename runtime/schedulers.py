"""DPM-Solver++ (multistep, order 2) and DDIM in numpy, matching diffusers' schedulers.

A *plan* holds the timesteps and per-step coefficients for one (config, steps) pair: immutable, shared
between requests. A request keeps its own ``SolverState`` (the previous data prediction for DPM).
The coefficients follow diffusers' ``DPMSolverMultistepScheduler.from_config(<DDIM config>)`` —
algorithm dpmsolver++, solver_order 2, midpoint, lower_order_final, final_sigmas_type "zero" — and
``DDIMScheduler`` with eta 0; the noise schedule is computed in float32 as diffusers does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, fields

import numpy as np

from .errors import InvalidRequestError

SCHEDULERS = ("dpmsolver++", "ddim")


def alphas_cumprod(cfg: dict) -> np.ndarray:
    """ᾱ_t for t = 0 … T-1, float32 like diffusers (``scaled_linear`` or ``linear`` betas)."""
    n = cfg["num_train_timesteps"]
    if cfg["beta_schedule"] == "scaled_linear":
        betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=np.float64).astype(np.float32) ** 2
    elif cfg["beta_schedule"] == "linear":
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=np.float64).astype(np.float32)
    else:
        raise InvalidRequestError(f"beta_schedule {cfg['beta_schedule']!r} is not one of scaled_linear, linear")
    return np.cumprod((np.float32(1.0) - betas).astype(np.float32), dtype=np.float32)


def max_steps(kind: str, cfg: dict) -> int:
    """Most steps whose timesteps stay inside [0, T): leading spacing adds ``steps_offset`` to
    multiples of T // steps (DDIM) or T // (steps + 1) (DPM-Solver, which also needs steps + 1 ≤ T)."""
    offset = cfg.get("steps_offset", 0) if cfg.get("timestep_spacing", "leading") == "leading" else 0
    return cfg["num_train_timesteps"] - offset - (1 if kind == "dpmsolver++" else 0)


@dataclass
class SolverState:
    """Per-request state: the previous step's data prediction (DPM-Solver++ only)."""

    prev_x0: np.ndarray | None = None


@dataclass(frozen=True)
class Plan:
    """Timesteps and update coefficients. Step i maps (x, ε) to x_next as

        x0      = (x - sig_s[i] · ε) / alp_s[i]
        x_next  = cx[i] · x + c0[i] · x0 + c1[i] · prev_x0
    """

    kind: str
    timesteps: np.ndarray  # int64 [steps]
    alp_s: np.ndarray
    sig_s: np.ndarray
    cx: np.ndarray
    c0: np.ndarray
    c1: np.ndarray

    init_noise_sigma: float = 1.0

    def __post_init__(self):
        for f in fields(self):  # shared between requests and threads (``Plans``): nothing may write into it
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value.setflags(write=False)

    def step(self, i: int, eps: np.ndarray, x: np.ndarray, state: SolverState) -> np.ndarray:
        """One update; ``eps`` and ``x`` are [B, C, F, M]; returns x_next in x's dtype."""
        out, state.prev_x0 = self.update(i, eps, x, state.prev_x0)
        return out

    def update(self, i: int, eps: np.ndarray, x: np.ndarray, prev_x0: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(x_next, x0) for step i, in x's dtype (computed in float64); ``prev_x0`` may be None while c1[i] is 0."""
        x0 = (x - self.sig_s[i] * eps) / self.alp_s[i]
        out = self.cx[i] * x + self.c0[i] * x0
        if self.c1[i] != 0.0:
            out = out + self.c1[i] * prev_x0
        return out.astype(x.dtype, copy=False), x0.astype(x.dtype, copy=False)

    def coefficients(self, i: int) -> np.ndarray:
        """float32 [5]: σ_s, α_s, c_x, c_0, c_1 of step i, as the solver-step graph takes them."""
        return np.array([self.sig_s[i], self.alp_s[i], self.cx[i], self.c0[i], self.c1[i]], dtype=np.float32)

    def coefficient_table(self, capacity: int) -> np.ndarray:
        """float32 [capacity, 5]: row i is ``coefficients(i)``, rows past the plan's steps zero (the solver-step
        graph's table, sized once for every plan: see export/solver_graph.py)."""
        steps = len(self.timesteps)
        self._check_capacity(capacity)
        table = np.zeros((capacity, 5), np.float32)
        table[:steps] = np.stack([self.sig_s, self.alp_s, self.cx, self.c0, self.c1], axis=1).astype(np.float32)
        return table

    def timestep_table(self, capacity: int) -> np.ndarray:
        """int64 [capacity + 1]: entry i is step i's timestep; entries from the plan's end on repeat its last (what
        the graph hands the UNet after the last step, never run)."""
        steps = len(self.timesteps)
        self._check_capacity(capacity)
        table = np.full(capacity + 1, self.timesteps[-1], np.int64)
        table[:steps] = self.timesteps
        return table

    def _check_capacity(self, capacity: int) -> None:
        if len(self.timesteps) > capacity:
            raise ValueError(f"a plan of {len(self.timesteps)} steps does not fit a table of {capacity}")


class Plans:
    """The plans of one scheduler config, each made once per (kind, steps) and then shared (plans are immutable):
    a request's plan costs a dictionary lookup instead of ~0.3 ms of numpy, and the device loop's solver buffers
    keep its tables loaded from one request to the next (``denoising.SolverBuffers.load_plan``). The ``size`` most
    recently used are kept. Thread-safe."""

    def __init__(self, cfg: dict, size: int = 32):
        self._cfg, self._size = cfg, size
        self._plans: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind: str, steps: int) -> Plan:
        key = (kind, steps)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = make_plan(kind, self._cfg, steps)  # outside the lock: two threads may both make it, one is kept
        with self._lock:
            plan = self._plans.setdefault(key, plan)
            self._plans.move_to_end(key)
            while len(self._plans) > self._size:
                self._plans.popitem(last=False)
        return plan


def make_plan(kind: str, cfg: dict, steps: int) -> Plan:
    if kind == "dpmsolver++":
        return _dpm_plan(cfg, steps)
    if kind == "ddim":
        return _ddim_plan(cfg, steps)
    raise InvalidRequestError(f"scheduler {kind!r} is not one of {', '.join(SCHEDULERS)}")


def timesteps(kind: str, cfg: dict, steps: int) -> np.ndarray:
    """The int64 timesteps diffusers' ``set_timesteps(steps)`` gives for this scheduler and config."""
    n = cfg["num_train_timesteps"]
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing == "leading":
        # DPM-Solver divides by steps + 1 and drops the last entry; DDIM divides by steps.
        count = steps + 1 if kind == "dpmsolver++" else steps
        t = (np.arange(0, count) * (n // count)).round()[::-1][:steps]
        return t.astype(np.int64) + cfg.get("steps_offset", 0)
    if spacing == "trailing":
        return (np.round(np.arange(n, 0, -n / steps)) - 1).astype(np.int64)
    if spacing == "linspace":
        if kind == "dpmsolver++":
            return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    raise InvalidRequestError(f"timestep_spacing {spacing!r} is not one of leading, trailing, linspace")


def _dpm_plan(cfg: dict, steps: int) -> Plan:
    acp = alphas_cumprod(cfg)
    t = timesteps("dpmsolver++", cfg, steps)
    table = ((1 - acp) / acp) ** 0.5  # float32, as diffusers
    sigmas = np.concatenate([table[t], [0.0]]).astype(np.float32).astype(np.float64)
    alpha = 1.0 / np.sqrt(sigmas**2 + 1.0)
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at the final sigma 0
    cx, c0, c1 = np.zeros(steps), np.zeros(steps), np.zeros(steps)
    for i in range(steps):
        phi = -np.expm1(-(lam[i + 1] - lam[i])) if np.isfinite(lam[i + 1]) else 1.0  # 1 - e^{-h}
        cx[i] = sigma[i + 1] / sigma[i]
        first_order = i == 0 or i == steps - 1  # lower_order_final with final sigma 0: last step is 1st order
        if first_order:
            c0[i] = alpha[i + 1] * phi
        else:
            r0 = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            c0[i] = alpha[i + 1] * phi * (1.0 + 0.5 / r0)
            c1[i] = -alpha[i + 1] * phi * 0.5 / r0
    return Plan("dpmsolver++", t, alpha[:steps], sigma[:steps], cx, c0, c1)


def _ddim_plan(cfg: dict, steps: int) -> Plan:
    acp = alphas_cumprod(cfg).astype(np.float64)
    n = cfg["num_train_timesteps"]
    t = timesteps("ddim", cfg, steps)
    final = 1.0 if cfg.get("set_alpha_to_one", True) else acp[0]
    prev = t - n // steps
    a_t = acp[t]
    a_prev = np.where(prev >= 0, acp[np.clip(prev, 0, None)], final)
    # x_prev = sqrt(ā_prev)·x0 + sqrt(1-ā_prev)·ε, with ε = (x - sqrt(ā_t)·x0)/sqrt(1-ā_t)
    sq_a, sq_b = np.sqrt(a_t), np.sqrt(1.0 - a_t)
    cx = np.sqrt(1.0 - a_prev) / sq_b
    c0 = np.sqrt(a_prev) - np.sqrt(1.0 - a_prev) * sq_a / sq_b
    return Plan("ddim", t, sq_a, sq_b, cx, c0, np.zeros(steps))
