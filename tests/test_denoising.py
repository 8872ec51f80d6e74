"""The denoising loop kept on the device (denoising.DeviceStepper) against the host loop, on the CPU with I/O
binding: the solver-step graph against a float64 numpy step, and whole requests — alone, batched, padded,
cancelled, non-finite, from several threads — against the host loop's results."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from audioldm2_trt.runtime.errors import InvalidRequestError, NonFiniteError, RequestCancelled

from .conftest import CpuStream, _has, needs_export

FAST = dict(num_inference_steps=4, audio_length_in_s=2.0)
CFG_CASES = [("a dog barks", 1, 3.5), ("rain falling on a metal roof in a storm at night, thunder far away", 2, 2.0),
             ("x", 3, 3.5)]


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def device_runtime(tiny_artifacts):
    from audioldm2_trt.runtime import AudioLDM2Runtime

    return AudioLDM2Runtime.load(tiny_artifacts, device="cpu", device_loop=True)


def _scheduler_config() -> dict:
    """The full-size checkpoint's scheduler config, as shipped (a plain JSON file: no torch needed)."""
    from audioldm2_trt.export.sources import CONFIG_ROOT

    return json.loads((CONFIG_ROOT / "audioldm2" / "scheduler.json").read_text())


def _solver_session():
    import onnxruntime as ort

    from audioldm2_trt.runtime.pipeline import SOLVER_STEP_GRAPH

    return ort.InferenceSession(str(SOLVER_STEP_GRAPH), providers=["CPUExecutionProvider"])


@pytest.mark.skipif(not _has("onnx"), reason="needs onnx (the export extra) to rebuild the graph")
def test_shipped_solver_graph_is_the_one_the_builder_makes():
    import onnx

    from audioldm2_trt.export.solver_graph import GRAPH_FILE, build_solver_step

    assert onnx.load(str(GRAPH_FILE)).graph == build_solver_step().graph


@pytest.mark.parametrize("kind", ["dpmsolver++", "ddim"])
@pytest.mark.parametrize("cfg", [True, False])
def test_solver_graph_equals_numpy_guidance_and_update(kind, cfg):
    """Every step of a 6-step plan on random rows: the graph (float32) against CFG + ``Plan.update`` in
    float64, chained over its own outputs (state and step counter) as the device loop chains them; it hands on the
    plan's next timestep."""
    from audioldm2_trt.runtime.schedulers import make_plan

    session, rng = _solver_session(), np.random.default_rng(0)
    plan = make_plan(kind, _scheduler_config(), 6)
    capacity = 1000
    tables = {"coefficient_table": plan.coefficient_table(capacity), "timestep_table": plan.timestep_table(capacity)}
    step = np.array([0], np.int64)
    rows, k = 3, 2 if cfg else 1
    guidance = np.array([3.5, 1.0, 7.0], np.float32)[:, None, None, None]
    x = rng.standard_normal((rows, 8, 5, 16), dtype=np.float32)
    prev = np.zeros_like(x)
    ref_x, ref_prev = x.astype(np.float64), None
    for i in range(6):
        noise = rng.standard_normal((k * rows, 8, 5, 16), dtype=np.float32)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {
            "noise_pred": noise, "x": x, "prev_x0": prev, "guidance": guidance, "step": step, **tables})))
        uncond, text = noise[:rows].astype(np.float64), noise[-rows:].astype(np.float64)
        eps = uncond + guidance * (text - uncond)
        ref_x, ref_prev = plan.update(i, eps, ref_x, ref_prev)
        assert rel_l2(got["x_next"], ref_x) < 1e-5 and rel_l2(got["x0"], ref_prev) < 1e-5, i
        np.testing.assert_array_equal(got["sample_next"], np.concatenate([got["x_next"]] * k))
        np.testing.assert_array_equal(got["row_check"], np.zeros(rows, np.float32))
        assert got["step_next"].tolist() == [i + 1]
        assert got["timestep_next"].tolist() == [plan.timesteps[min(i + 1, 5)]]
        x, prev, step = got["x_next"], got["x0"], got["step_next"]


def test_solver_graph_row_check_flags_exactly_the_non_finite_rows():
    from audioldm2_trt.runtime.schedulers import make_plan

    session = _solver_session()
    plan = make_plan("dpmsolver++", _scheduler_config(), 4)
    noise = np.ones((8, 8, 2, 16), np.float32)  # CFG, 4 rows
    noise[1, 3, 1, 7] = np.nan  # row 1's uncond half
    noise[4 + 2, 0, 0, 0] = np.inf  # row 2's text half
    x = np.zeros((4, 8, 2, 16), np.float32)
    feeds = {"noise_pred": noise, "x": x, "prev_x0": x, "guidance": np.full((4, 1, 1, 1), 3.0, np.float32),
             "step": np.array([1], np.int64), "coefficient_table": plan.coefficient_table(8),
             "timestep_table": plan.timestep_table(8)}
    check = session.run(["row_check"], feeds)[0]
    assert np.isfinite(check).tolist() == [True, False, False, True]


@needs_export
@pytest.mark.parametrize("kw", [
    dict(prompt="birds chirping in a forest", negative_prompt="low quality, noisy"),
    dict(prompt="a dog barking", guidance_scale=1.0),
    dict(prompt="thunder", scheduler="ddim", num_inference_steps=7),
    dict(prompt="an orchestra", num_waveforms_per_prompt=3),  # 3 rows padded to 4, ranked
    dict(prompt=["thunder", "an orchestra playing a slow sad melody with violins"], negative_prompt=["a", "b"]),
], ids=["negative", "guidance-1", "ddim", "three-waveforms", "two-prompts"])
def test_device_loop_equals_host_loop(runtime, device_runtime, kw):
    kw = {**FAST, "seed": 5, **kw}
    host, device = runtime(**kw), device_runtime(**kw)
    assert np.abs(host.audios).max() > 1e-3
    assert rel_l2(device.audios, host.audios) < 1e-4
    if host.scores is not None:
        np.testing.assert_allclose(device.scores, host.scores, rtol=1e-4, atol=1e-5)
    assert device_runtime._solver_step.stats.runs > 0 and runtime._solver_step is None
    assert device_runtime.health()["device_loop"] is True and runtime.health()["device_loop"] is False


@needs_export
def test_device_loop_keeps_one_solver_buffer_set_per_unet_key(runtime, device_runtime):
    """Requests of one shape reuse that UNet key's SolverBuffers: after an odd step count (the state ends in the
    second pair), an even one, a single step, and with NaN left in every state buffer, the first request again
    equals the host loop, as each does."""
    kw = dict(prompt="a cat", audio_length_in_s=2.0)
    device_runtime(**kw, num_inference_steps=3, seed=1)
    made = dict(device_runtime._solver_buffers)
    for steps, seed in [(3, 1), (4, 2), (1, 7), (3, 1)]:
        host = runtime(**kw, num_inference_steps=steps, seed=seed)
        device = device_runtime(**kw, num_inference_steps=steps, seed=seed)
        assert rel_l2(device.audios, host.audios) < 1e-4, (steps, seed)
    assert device_runtime._solver_buffers.keys() == made.keys()  # nothing new allocated for this shape
    assert all(device_runtime._solver_buffers[k] is v for k, v in made.items())
    for buffers in made.values():  # what a request that went non-finite would leave: the next starts clean
        for value in [*buffers.xs, *buffers.prevs, *buffers.row_checks]:
            value.update_inplace(np.full(value.shape(), np.nan, np.float32))
    host, device = runtime(**kw, num_inference_steps=3, seed=1), device_runtime(**kw, num_inference_steps=3, seed=1)
    assert rel_l2(device.audios, host.audios) < 1e-4
    assert all(b.unet_key.outputs["noise_pred"] is b.bindings[0].inputs["noise_pred"] for b in made.values())


def _batch_with_a_cancelled_and_a_non_finite_item(runtime, rt, monkeypatch, poisoned_replay: int) -> list:
    """Three items in one batch (4 padded rows) on ``rt``: item 1 cancelled by its own callback at step 1, the UNet's
    row 1 (item 2, once item 1 has left) made NaN at its ``poisoned_replay``-th replay (step 3); item 1 must end
    before step 2, item 2 at step 3, and item 0 equal its single run on ``runtime``. Returns the rows of each UNet
    replay."""
    singles = {c: runtime(c[0], seed=c[1], guidance_scale=c[2], **FAST).audios for c in CFG_CASES}
    cancel = threading.Event()
    items = [rt.prepare(p, seed=s, guidance_scale=g, **FAST,
                        callback=(lambda i, n: cancel.set() if i == 1 else None) if j == 1 else None,
                        cancel=cancel if j == 1 else None)
             for j, (p, s, g) in enumerate([CFG_CASES[0], CFG_CASES[1], (CFG_CASES[2][0], 3, 2.0)])]
    unet = rt._sessions["unet"]
    replays = []
    real_replay = unet.replay

    def replay_poisoning_row_1(bound, updates, wait=True):  # after item 1 left, item 2 is row 1
        real_replay(bound, updates, wait)
        replays.append(len(bound.inputs["sample"].numpy()))
        if len(replays) == poisoned_replay:
            noise = bound.outputs["noise_pred"].numpy().copy()
            noise[1] = np.nan
            bound.outputs["noise_pred"].update_inplace(noise)

    monkeypatch.setattr(unet, "replay", replay_poisoning_row_1)
    results = rt.run_batch(items)
    assert isinstance(results[1], RequestCancelled) and "before denoising step 2 of 4" in str(results[1])
    assert isinstance(results[2], NonFiniteError) and "unet (step 3)" in str(results[2])
    assert rel_l2(results[0].audios, singles[CFG_CASES[0]]) < 1e-4
    return replays


@needs_export
def test_device_loop_batch_with_a_cancelled_and_a_non_finite_item(runtime, device_runtime, monkeypatch):
    """Three items in one batch (4 padded rows): item 1 cancelled before step 2, item 2's rows turn NaN at
    step 3; item 0 carries on through two re-opened steppers and equals its single run."""
    replays = _batch_with_a_cancelled_and_a_non_finite_item(runtime, device_runtime, monkeypatch, 4)
    assert replays == [8, 8, 4, 4]  # 3 rows → 4 (×2 CFG); then 2 rows → 2 (×2)


@needs_export
def test_device_loop_from_threads_keeps_each_request_its_own(runtime, device_runtime):
    """Four threads at once: each loop holds the UNet's buffers from its first step to its last."""
    cases = [("a dog barks", 1), ("a violin", 2), ("footsteps on gravel", 3), ("rain", 4)]
    want = {c: runtime(c[0], seed=c[1], **FAST).audios for c in cases}
    got, errors = {}, []

    def worker(case):
        try:
            got[case] = device_runtime(case[0], seed=case[1], **FAST).audios
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(c,)) for c in cases]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors and set(got) == set(cases)
    for c in cases:
        assert rel_l2(got[c], want[c]) < 1e-4, c


def test_device_loop_counts_a_step_as_capturing_while_either_solver_binding_may_capture():
    """Loops start on the first binding, so odd-length loops leave the second behind: with the UNet and the first
    binding captured and the second not, the next steps must still go one at a time under the exclusive guard."""
    from types import SimpleNamespace

    from audioldm2_trt.runtime.backends.ort_session import CAPTURE_RUNS
    from audioldm2_trt.runtime.denoising import DeviceStepper

    session = SimpleNamespace(may_capture=lambda bound: bound.runs < CAPTURE_RUNS)
    stepper = DeviceStepper.__new__(DeviceStepper)
    stepper._unet, stepper._solver, stepper._current = session, session, 0
    stepper._bound = SimpleNamespace(runs=CAPTURE_RUNS + 5)
    bindings = [SimpleNamespace(runs=CAPTURE_RUNS + 5), SimpleNamespace(runs=CAPTURE_RUNS - 1)]
    stepper._buffers = SimpleNamespace(bindings=bindings)
    assert stepper._may_capture()
    bindings[1].runs = CAPTURE_RUNS
    assert not stepper._may_capture()


def _callback_error_at_step_2_comes_back_and_frees_the_unet(rt) -> None:
    """A request whose progress callback raises at step 2: that exception comes back as it is (not as a backend
    error), and the UNet's session is free again afterwards."""
    def failing(i, n):
        if i == 2:
            raise ValueError("the client went away")

    with pytest.raises(ValueError, match="the client went away"):
        rt("a bell", seed=0, callback=failing, **FAST)
    unet = rt._sessions["unet"]
    assert unet.held().acquire(timeout=1)
    unet.held().release()


@needs_export
def test_device_loop_progress_callbacks_and_their_errors(device_runtime):
    """Steps run on the UNet's worker between callbacks: each step reported once, in order; a callback's own
    exception comes back as it is (not as a backend error), and the UNet is free again after it."""
    seen = []
    device_runtime("a bell", seed=0, callback=lambda i, n: seen.append((i, n)), **FAST)
    assert seen == [(i, FAST["num_inference_steps"]) for i in range(FAST["num_inference_steps"])]
    _callback_error_at_step_2_comes_back_and_frees_the_unet(device_runtime)
    assert np.isfinite(device_runtime("a bell", seed=0, **FAST).audios).all()


@needs_export
def test_device_loop_past_max_graphs_runs_on_the_host(tiny_artifacts, runtime):
    from audioldm2_trt.runtime import AudioLDM2Runtime

    rt = AudioLDM2Runtime.load(tiny_artifacts, device="cpu", device_loop=True, max_graphs=0)
    kw = dict(prompt="a cat", seed=0, **FAST)
    assert rel_l2(rt(**kw).audios, runtime(**kw).audios) < 1e-4
    assert rt._solver_step.stats.runs == 0 and rt._sessions["unet"].stats.uncaptured_keys > 0
    rt.close()


@needs_export
def test_device_loop_off_onnx_runtime_is_refused(tiny_artifacts):
    from audioldm2_trt.runtime import AudioLDM2Runtime

    with pytest.raises(InvalidRequestError, match="device_loop runs on backend 'ort'.*'ort-trt'"):
        AudioLDM2Runtime.load(tiny_artifacts, device="cuda", backend="ort-trt", device_loop=True)


@needs_export
def test_device_loop_backend_failure_names_the_step_and_frees_the_unet(device_runtime, monkeypatch):
    from audioldm2_trt.runtime.errors import BackendError

    unet = device_runtime._sessions["unet"]
    calls = []

    def failing_execute(bound, wait=True):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA failure 700")
        return real_execute(bound, wait)

    real_execute = unet._execute
    monkeypatch.setattr(unet, "_execute", failing_execute)
    with pytest.raises(BackendError, match=r"unet failed in denoising step 1 .*CUDA failure 700"):
        device_runtime("a bell", seed=0, **FAST)
    monkeypatch.undo()
    assert unet.held().acquire(timeout=1)  # released by the failed loop
    unet.held().release()
    assert np.isfinite(device_runtime("a bell", seed=0, **FAST).audios).all()


@pytest.fixture
def ahead_runtime(tiny_artifacts):
    from audioldm2_trt.runtime import AudioLDM2Runtime

    rt = AudioLDM2Runtime.load(tiny_artifacts, device="cpu", device_loop=True)
    stream = CpuStream()
    rt._sessions["unet"].stream = rt._solver_step.stream = stream
    yield rt, stream
    rt._sessions["unet"].stream = rt._solver_step.stream = None  # not a CudaStream: nothing to release
    rt.close()


@needs_export
@pytest.mark.parametrize("kw", [
    dict(prompt="birds chirping in a forest", negative_prompt="low quality, noisy"),
    dict(prompt="thunder", scheduler="ddim", num_inference_steps=7),
    dict(prompt="an orchestra", num_waveforms_per_prompt=3),
], ids=["negative", "ddim", "three-waveforms"])
def test_steps_queued_ahead_equal_the_host_loop(runtime, ahead_runtime, kw):
    rt, stream = ahead_runtime
    kw = {**FAST, "seed": 5, **kw}
    seen = []
    got = rt(**kw, callback=lambda i, n: seen.append(i))
    assert rel_l2(got.audios, runtime(**kw).audios) < 1e-4
    steps = kw["num_inference_steps"]
    assert seen == list(range(steps))
    assert stream.waited == stream.recorded > 0  # every queued step waited for once, none left behind
    assert rt.health()["device_loop"] is True


@needs_export
def test_steps_queued_ahead_with_a_cancelled_and_a_non_finite_item(runtime, ahead_runtime, monkeypatch):
    """As the batch test above, with the steps queued one ahead: the cancel set by item 1's callback for step 1 is
    seen after step 2 was queued, which is dropped (the UNet ran it once more at 8 rows); items 0 and 2 go on from
    step 2, and the loop's results are those of the step-by-step loop."""
    rt, _ = ahead_runtime
    # steps 0, 1, 2 (dropped) at 8 rows, then 2 and 3 at 4: step 3 is the fifth replay
    replays = _batch_with_a_cancelled_and_a_non_finite_item(runtime, rt, monkeypatch, 5)
    assert replays == [8, 8, 8, 4, 4]


@needs_export
def test_steps_queued_ahead_stop_at_a_callback_error_and_free_the_unet(runtime, ahead_runtime):
    """A callback raising at step 2 of 4 while step 3 is queued: its exception comes back as it is, the UNet is
    free, and the next request (which starts from the tables and counter again) equals the host loop."""
    rt, _ = ahead_runtime
    _callback_error_at_step_2_comes_back_and_frees_the_unet(rt)
    kw = dict(prompt="a bell", seed=0, **FAST)
    assert rel_l2(rt(**kw).audios, runtime(**kw).audios) < 1e-4


@needs_export
def test_queued_steps_where_they_cannot_apply_are_refused(tiny_artifacts):
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory
    from audioldm2_trt.runtime.errors import BackendError

    with pytest.raises(InvalidRequestError, match="queued_steps needs the device loop on CUDA.*device cpu"):
        AudioLDM2Runtime.load(tiny_artifacts, device="cpu", device_loop=True, queued_steps=True)
    with pytest.raises(InvalidRequestError, match="queued_steps applies to backend 'ort'.*'trt'"):
        AudioLDM2Runtime.load(tiny_artifacts, device="cuda", backend="trt", queued_steps=True)
    with pytest.raises(BackendError, match="loop_stream needs the default CUDA provider with CUDA graphs"):
        OrtSessionFactory("cpu", loop_stream=True)
    rt = AudioLDM2Runtime.load(tiny_artifacts, device="cpu", device_loop=True, queued_steps=False)
    assert rt.health()["device_loop"] is True and rt.health()["queued_steps"] is False
    rt.close()


class _Recorded:
    """A stand-in for an OrtValue that records what is copied into it."""

    def __init__(self, shape):
        self._shape, self.copies = shape, []

    def shape(self):
        return list(self._shape)

    def update_inplace(self, array):
        self.copies.append(np.array(array, copy=True))


def test_solver_buffers_copy_a_plans_tables_only_when_another_plan_was_loaded():
    """``SolverBuffers.load_plan``: the tables (which the solver step only reads) are copied in for a plan other
    than the one they hold; the step counter and the UNet's timestep every time."""
    from audioldm2_trt.runtime.denoising import SolverBuffers
    from audioldm2_trt.runtime.schedulers import Plans

    plans = Plans(_scheduler_config())
    capacity = 1000
    coefficients, timestep_table = _Recorded((capacity, 5)), _Recorded((capacity + 1,))
    steps, timestep = [_Recorded((1,)), _Recorded((1,))], _Recorded((1,))
    unet_key = type("Key", (), {"inputs": {"timestep": timestep}})()
    buffers = SolverBuffers(unet_key, [], [], steps, None, coefficients, timestep_table, [], [], None)
    dpm20, ddim7 = plans.get("dpmsolver++", 20), plans.get("ddim", 7)
    for plan, start in ((dpm20, 0), (dpm20, 0), (ddim7, 0), (dpm20, 3)):
        buffers.load_plan(plan, start, 0)
    assert len(coefficients.copies) == len(timestep_table.copies) == 3  # dpm20, ddim7, dpm20 again
    np.testing.assert_array_equal(coefficients.copies[-1], dpm20.coefficient_table(capacity))
    np.testing.assert_array_equal(timestep_table.copies[1], ddim7.timestep_table(capacity))
    assert [c.tolist() for c in steps[0].copies] == [[0], [0], [0], [3]]
    assert [c.tolist() for c in timestep.copies] == [[int(p.timesteps[s])] for p, s in
                                                     ((dpm20, 0), (dpm20, 0), (ddim7, 0), (dpm20, 3))]


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("lengths", [(20,), (32,), (20, 7)], ids=["one-padded", "one-unpadded", "two"])
def test_unet_conditioning_rows_and_padding(cfg, lengths):
    """The UNet's conditioning feeds for a batch of items, against the layout written out here: under CFG every
    item's negative rows, then every item's positive rows (diffusers' order), T5 states zero-padded and their mask 0
    up to the bucket, then each half repeated from its last row up to the batch bucket. One item whose T5 length is
    the bucket's reads its own arrays (no copy), and nothing here writes to them."""
    import types

    from audioldm2_trt.runtime.conditioning import Conditioning
    from audioldm2_trt.runtime.pipeline import _pad_halves, _unet_conditioning
    from audioldm2_trt.runtime.shapes import batch_bucket, t5_bucket

    rng = np.random.default_rng(len(lengths))
    items, waves = [], [1, 2][: len(lengths)]
    for length, n in zip(lengths, waves):
        rows = n * (2 if cfg else 1)
        mask = (rng.random((rows, length)) < 0.8).astype(np.int64)
        cond = Conditioning(rng.standard_normal((rows, 8, 12), dtype=np.float32),
                            rng.standard_normal((rows, length, 6), dtype=np.float32), mask, np.zeros((n, 4), np.float32))
        req = types.SimpleNamespace(do_cfg=cfg, guidance_scale=2.0 + len(items))
        items.append(types.SimpleNamespace(cond=cond, latents=np.zeros((n, 2, 4, 4), np.float32), req=req))
    before = [(it.cond.generated.copy(), it.cond.t5.copy(), it.cond.t5_mask.copy()) for it in items]
    bucket = t5_bucket(max(lengths))
    feeds, guidance = _unet_conditioning(items, bucket)

    def want(field: str) -> np.ndarray:
        halves = []
        for half in ([0, 1] if cfg else [None]):
            rows = []
            for it, n in zip(items, waves):
                a = getattr(it.cond, field)
                a = a if half is None else a[half * n: (half + 1) * n]
                if field != "generated":  # T5 and its mask padded to the bucket with zeros
                    a = np.pad(a, [(0, 0), (0, bucket - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
                rows.append(a)
            halves.append(np.concatenate(rows))
        return np.concatenate(halves)

    for name, field in [("encoder_hidden_states", "generated"), ("encoder_hidden_states_1", "t5"),
                        ("encoder_attention_mask_1", "t5_mask")]:
        np.testing.assert_array_equal(feeds[name], want(field))
        assert feeds[name].dtype == want(field).dtype
    np.testing.assert_array_equal(guidance[:, 0, 0, 0], np.concatenate(
        [np.full(n, it.req.guidance_scale, np.float32) for it, n in zip(items, waves)]))
    if len(items) == 1 and lengths[0] == bucket:
        assert feeds["encoder_hidden_states_1"] is items[0].cond.t5
    padded = batch_bucket(len(guidance))
    for name, x in feeds.items():
        got = _pad_halves(x, padded, cfg)
        halves = np.split(x, 2) if cfg else [x]
        expect = np.concatenate([np.concatenate([h] + [h[-1:]] * (padded - len(h))) for h in halves])
        np.testing.assert_array_equal(got, expect)
        if len(x) == padded * (2 if cfg else 1):
            assert got is x
    for it, (g, t, m) in zip(items, before):
        np.testing.assert_array_equal(it.cond.generated, g)
        np.testing.assert_array_equal(it.cond.t5, t)
        np.testing.assert_array_equal(it.cond.t5_mask, m)
