"""The numpy schedulers against diffusers' in float64: timesteps exactly, every update to 1e-6."""

from __future__ import annotations

import json

import numpy as np
import pytest

from audioldm2_trt.runtime.schedulers import SolverState, make_plan, max_steps, timesteps

from .conftest import needs_export

pytestmark = needs_export


def _config():
    from audioldm2_trt.export.sources import CONFIG_ROOT

    return json.loads((CONFIG_ROOT / "audioldm2" / "scheduler.json").read_text())


def _reference(kind, cfg):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ddim = DDIMScheduler(**cfg)
    return DPMSolverMultistepScheduler.from_config(ddim.config) if kind == "dpmsolver++" else ddim


@pytest.mark.parametrize("kind", ["dpmsolver++", "ddim"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 50, 200, 500, "max"])
def test_every_update_matches_diffusers(kind, steps):
    import torch

    cfg = _config()
    steps = max_steps(kind, cfg) if steps == "max" else steps
    ref = _reference(kind, cfg)
    ref.set_timesteps(steps)
    plan = make_plan(kind, cfg, steps)
    np.testing.assert_array_equal(plan.timesteps, ref.timesteps.numpy())
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((2, 8, 12, 4))
    state = SolverState()
    # diffusers forms DPM's h = λ_t - λ_s in float32 from logs near 4.4 (ulp 5e-7): with ~1000 steps,
    # h ≈ 0.01 carries ~5e-5 relative rounding, which bounds agreement to ~1.3e-6 there (we use float64).
    tolerance = 2e-6 if steps > 500 else 1e-6
    for i, t in enumerate(ref.timesteps):
        eps = rng.standard_normal(x.shape)
        want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
        got = plan.step(i, eps, x, state)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < tolerance, (i, int(t))
        x = want  # next step from diffusers' sample, so each update is compared on its own


def test_plan_is_shared_and_state_is_per_request():
    cfg = _config()
    plan = make_plan("dpmsolver++", cfg, 5)
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((1, 8, 4, 4)), [rng.standard_normal((1, 8, 4, 4)) for _ in range(5)]

    def run():
        x, s = x0, SolverState()
        for i in range(5):
            x = plan.step(i, eps[i], x, s)
        return x

    a = run()
    b = run()
    np.testing.assert_array_equal(a, b)


def test_max_steps_keeps_timesteps_in_range():
    cfg = _config()
    for kind in ("dpmsolver++", "ddim"):
        n = max_steps(kind, cfg)
        assert make_plan(kind, cfg, n).timesteps.max() < cfg["num_train_timesteps"]
        assert timesteps(kind, cfg, n + 1).max() >= cfg["num_train_timesteps"]


@pytest.mark.parametrize("kind", ["dpmsolver++", "ddim"])
def test_plan_tables_hold_every_step_and_the_longest_plan_fits(kind):
    """The solver-step graph's tables: row i is step i's coefficients and timestep; the longest plan the scheduler
    allows fits a table of num_train_timesteps rows (the runtime's size), with the extra timestep entry after it."""
    cfg = _config()
    capacity = cfg["num_train_timesteps"]
    plan = make_plan(kind, cfg, 7)
    coefficients, steps = plan.coefficient_table(capacity), plan.timestep_table(capacity)
    assert coefficients.shape == (capacity, 5) and coefficients.dtype == np.float32
    assert steps.shape == (capacity + 1,) and steps.dtype == np.int64
    for i in range(7):
        np.testing.assert_array_equal(coefficients[i], plan.coefficients(i))
    assert not coefficients[7:].any()
    assert steps[:7].tolist() == plan.timesteps.tolist() and set(steps[7:].tolist()) == {plan.timesteps[-1]}
    longest = make_plan(kind, cfg, max_steps(kind, cfg))
    assert longest.coefficient_table(capacity).shape == (capacity, 5)
    with pytest.raises(ValueError, match="a plan of 7 steps does not fit a table of 6"):
        plan.timestep_table(6)


def test_plans_are_made_once_per_kind_and_steps_shared_and_read_only():
    """``Plans``: one plan object per (kind, steps) — what ``make_plan`` gives, its arrays read-only so that sharing
    it between requests is safe — the least recently used dropped past ``size``."""
    from audioldm2_trt.runtime.schedulers import Plans

    cfg = _config()
    plans = Plans(cfg, size=2)
    first = plans.get("dpmsolver++", 20)
    assert plans.get("dpmsolver++", 20) is first
    fresh = make_plan("dpmsolver++", cfg, 20)
    for name in ("timesteps", "alp_s", "sig_s", "cx", "c0", "c1"):
        np.testing.assert_array_equal(getattr(first, name), getattr(fresh, name))
        with pytest.raises(ValueError, match="read-only"):
            getattr(first, name)[0] = 0
    ddim = plans.get("ddim", 20)
    assert ddim.kind == "ddim" and plans.get("dpmsolver++", 20) is first  # both kept; the DPM plan used last
    plans.get("ddim", 7)  # a third: the least recently used (DDIM-20) goes
    assert plans.get("dpmsolver++", 20) is first and plans.get("ddim", 20) is not ddim
