"""CUDA graph capture kept alone in the process (runtime/backends/capture_guard.py).

On the H100 two runtimes driven from two threads, and one runtime under concurrent requests, failed with
"operation not permitted when stream is capturing" whenever a new shape key was captured while another
component ran (docs/benchmarks.md). Here, without a GPU: the guard's exclusion rules with real threads, and
which runs of a real ONNX Runtime session (the tiny VAE decoder on the CPU, bound, with graph ids) take the
guard exclusively.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from audioldm2_trt.runtime.backends import ort as ort_backend
from audioldm2_trt.runtime.backends import ort_session
from audioldm2_trt.runtime.backends.base import Device
from audioldm2_trt.runtime.backends.capture_guard import CaptureGuard

from .conftest import needs_export


def _overlaps(guard: CaptureGuard, kinds: list[str], hold_s: float = 0.2) -> list[tuple[str, int]]:
    """Start one thread per kind ('shared' / 'exclusive'); return (kind, holders at entry) per entry."""
    inside, log, lock = [0], [], threading.Lock()

    def worker(kind):
        with getattr(guard, kind)():
            with lock:
                inside[0] += 1
                log.append((kind, inside[0]))
            time.sleep(hold_s)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in kinds]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert not any(t.is_alive() for t in threads), "a guard holder never got in (deadlock)"
    return log


def test_exclusive_holder_is_alone_and_shared_holders_run_together():
    log = _overlaps(CaptureGuard(), ["shared"] * 4 + ["exclusive"] * 2 + ["shared"] * 4)
    assert len(log) == 10
    assert all(n == 1 for kind, n in log if kind == "exclusive")
    assert max(n for kind, n in log if kind == "shared") > 1  # ordinary runs are not serialised


def test_waiting_exclusive_holder_is_not_starved_by_new_shared_holders():
    guard, order = CaptureGuard(), []
    release = threading.Event()

    def long_shared():
        with guard.shared():
            order.append("shared-1 in")
            release.wait(5)

    def capture():
        with guard.exclusive():
            order.append("exclusive in")

    def late_shared():
        with guard.shared():
            order.append("shared-2 in")

    t1 = threading.Thread(target=long_shared)
    t1.start()
    while not order:
        time.sleep(0.001)
    t2 = threading.Thread(target=capture)
    t2.start()
    deadline = time.monotonic() + 10
    while guard._waiting_exclusive == 0 and time.monotonic() < deadline:  # the capture now waits for shared-1
        time.sleep(0.001)  # (polled, not a fixed sleep: a loaded CI machine may start t2 late)
    assert guard._waiting_exclusive == 1
    t3 = threading.Thread(target=late_shared)
    t3.start()
    time.sleep(0.05)
    assert order == ["shared-1 in"]  # shared-2 queues behind the waiting capture
    release.set()
    for t in (t1, t2, t3):
        t.join(5)
    assert order == ["shared-1 in", "exclusive in", "shared-2 in"]


class _RecordingGuard:
    def __init__(self):
        self.log = []

    @contextmanager
    def shared(self):
        self.log.append("shared")
        yield

    @contextmanager
    def exclusive(self):
        self.log.append("exclusive")
        yield


def test_new_shape_keys_run_exclusively_until_captured_then_shared(tiny_artifacts):
    factory = ort_backend.OrtSessionFactory("cpu", bind=True)
    session = factory.create("vae_decoder", tiny_artifacts / "vae_decoder.onnx")
    session.cuda_graphs = True  # graph ids as on CUDA; the CPU provider ignores them
    session._guard = guard = _RecordingGuard()
    shape = tuple(i.shape for i in session._session.get_inputs())[0]
    small = np.random.default_rng(0).standard_normal((1, shape[1], 8, shape[3]), dtype=np.float32)
    large = np.random.default_rng(1).standard_normal((1, shape[1], 16, shape[3]), dtype=np.float32)
    ref = session.run({"latents": small})["mel"].copy()
    for _ in range(ort_session.CAPTURE_RUNS + 2):
        out = session.run({"latents": small})["mel"]
    np.testing.assert_array_equal(out, ref)  # same buffers, same answer, run after run
    # first call: new key (probe + first graph run); then runs until CAPTURE_RUNS; then shared
    small_log = guard.log[:]
    first_shared = small_log.index("shared")
    assert set(small_log[:first_shared]) == {"exclusive"} and set(small_log[first_shared:]) == {"shared"}
    assert first_shared == ort_session.CAPTURE_RUNS - 1  # _make_bound already ran the key once
    guard.log.clear()
    session.run({"latents": large})  # a new shape: exclusive again
    assert guard.log == ["exclusive"]
    guard.log.clear()
    session.cuda_graphs = False  # without graphs nothing is ever captured
    session._bound.clear()
    session.run({"latents": small})
    assert guard.log == ["shared"]


def test_cuda_sessions_use_the_process_guard_and_cpu_sessions_none(tiny_artifacts):
    cpu = ort_backend.OrtSessionFactory("cpu").create("vocoder", tiny_artifacts / "vocoder.onnx")
    assert cpu._guard is None
    fake_cuda = ort_session.OrtSession("x", cpu._session, cpu._ort, Device.parse("cuda:1"), bind=True, cuda_graphs=True)
    assert fake_cuda._guard is ort_session.CUDA_CAPTURE_GUARD


def test_cuda_session_calls_onnx_runtime_from_one_worker_thread_whoever_calls(tiny_artifacts):
    """ONNX Runtime's CUDA provider keeps graph state per thread: every run of a CUDA session must come from
    the same thread, never the caller's."""
    cpu = ort_backend.OrtSessionFactory("cpu").create("vocoder", tiny_artifacts / "vocoder.onnx")
    session = ort_session.OrtSession("vocoder", cpu._session, cpu._ort, Device.parse("cuda:0"), bind=True,
                                     cuda_graphs=True)
    seen, callers = set(), set()

    def recording_run(feeds):
        seen.add(threading.get_ident())
        return {"waveform": feeds["mel"].sum()}

    session._run_bound = recording_run

    def caller(i):
        callers.add(threading.get_ident())
        assert session.run({"mel": np.full((1, 1, 4, 4), i, dtype=np.float32)})["waveform"] == 16 * i

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    caller(9)
    assert len(seen) == 1 and not seen & callers
    session._run_bound = lambda feeds: (_ for _ in ()).throw(RuntimeError("kernel failed"))
    try:
        session.run({"mel": np.zeros((1, 1, 4, 4), dtype=np.float32)})
    except ort_backend.BackendError as err:  # the worker's error reaches the caller, naming the component
        assert "vocoder failed on inputs" in str(err) and "kernel failed" in str(err)
    else:
        raise AssertionError("the worker's error was lost")
    session.close()
    session.close()  # twice is fine


def test_a_cuda_factory_makes_each_session_under_the_guard(tiny_artifacts, monkeypatch):
    """Creation allocates on the GPU (weights block, weights, kernels) and reads whether the shared arena has a
    captured graph: a CUDA factory does all of it holding the guard, shared, so no capture runs in between. Checked
    at the moment ONNX Runtime would be asked for the session (a CPU factory posing as CUDA's, stopped there)."""
    guard = CaptureGuard()
    monkeypatch.setattr(ort_backend, "CUDA_CAPTURE_GUARD", guard)
    factory = ort_backend.OrtSessionFactory("cpu")
    factory.device = Device.parse("cuda:0")
    held = []

    def stop(name, path, opts, providers, graphs):
        held.append(guard._shared)
        raise ort_backend.BackendError("stopped before ONNX Runtime")

    monkeypatch.setattr(factory, "_open", stop)
    with pytest.raises(ort_backend.BackendError, match="stopped before ONNX Runtime"):
        factory.create("vocoder", tiny_artifacts / "vocoder.onnx")
    assert held == [1] and guard._shared == 0  # held while making it, released after (an error included)
    cpu = ort_backend.OrtSessionFactory("cpu")
    monkeypatch.setattr(cpu, "_open", stop)
    with pytest.raises(ort_backend.BackendError):
        cpu.create("vocoder", tiny_artifacts / "vocoder.onnx")
    assert held == [1, 0]  # a CPU factory takes no guard


def test_one_component_named_for_cuda_graphs_is_that_component():
    """``cuda_graphs="unet"`` selects the UNet, not the letters of its name (as ``shared_arena`` reads one name)."""
    chosen = ort_backend._graph_selector("unet")
    assert chosen("unet") and not chosen("u") and not chosen("vocoder")
    assert all(ort_backend._graph_selector("auto")(n) for n in ("unet", "vocoder"))


@needs_export
def test_cuda_graphs_names_are_checked_and_captured_except_covers_every_session(tiny_artifacts):
    """``load(cuda_graphs=[...])`` refuses a name that is no session (a misspelt one would otherwise run uncaptured
    without a word), and ``captured_except`` leaves out exactly the names given, out of ``SESSION_NAMES``, which holds
    every session a runtime opens (the device loop's two small graphs too)."""
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.errors import InvalidRequestError
    from audioldm2_trt.runtime.pipeline import SESSION_NAMES, captured_except

    with pytest.raises(InvalidRequestError, match=r"cuda_graphs names unknown components \['unte'\]"):
        AudioLDM2Runtime.load(tiny_artifacts, cuda_graphs=["unte", "vocoder"])
    with pytest.raises(InvalidRequestError, match=r"uncaptured names unknown components \['t5'\]"):
        captured_except(("t5", "projection"))
    with pytest.raises(InvalidRequestError, match="uncaptured: expected session names, got True"):
        captured_except(True)
    text = ("clap_text", "t5_encoder", "projection")
    kept = captured_except(text)
    assert not set(kept) & set(text) and set(kept) | set(text) == set(SESSION_NAMES)
    assert captured_except("t5_encoder") == tuple(n for n in SESSION_NAMES if n != "t5_encoder")
    assert captured_except(()) == SESSION_NAMES  # none left out: what `bench --uncaptured none` asks for
    rt = AudioLDM2Runtime.load(tiny_artifacts, device="cpu", device_loop=True, cuda_graphs=kept)
    try:
        health = rt.health()
    finally:
        rt.close()
    assert health["device_loop"] and health["lm_loop"]  # the solver step's and GPT-2's append graph's sessions
    opened = {*health["components"], "solver_step", "lm_append"}
    assert {"unet", "clap_audio"} <= opened <= set(SESSION_NAMES)
