"""GPU-memory options of the ONNX Runtime backend: load(shared_arena=True), one arena for every session
(runtime/backends/shared_arena.py), the memory pattern (off on CUDA) and packed weights.

What it saves is GPU memory, measured on the GPU (scripts/peak_memory.py, docs/benchmarks.md). Here: the audio is
the default runtime's, the safety rules hold (runs on the arena take its lock; no session joins it after a graph
of it was captured), and what it does not apply to is refused by name.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from audioldm2_trt.runtime import AudioLDM2Runtime
from audioldm2_trt.runtime.backends.base import Device
from audioldm2_trt.runtime.backends.ort import OrtSessionFactory
from audioldm2_trt.runtime.backends.ort_session import OrtSession
from audioldm2_trt.runtime.backends.ort_options import default_mem_pattern
from audioldm2_trt.runtime.backends.shared_arena import shared_arena
from audioldm2_trt.runtime.errors import BackendError, InvalidRequestError

KW = dict(num_inference_steps=2, audio_length_in_s=2.5, seed=3)


def test_shared_arena_gives_the_default_runtimes_audio(tiny_artifacts, runtime):
    shared = AudioLDM2Runtime.load(tiny_artifacts, shared_arena=True)
    np.testing.assert_array_equal(shared("rain", **KW).audios, runtime("rain", **KW).audios)
    two = dict(KW, num_waveforms_per_prompt=2)  # the ranking sessions too
    out, ref = shared("rain on a tin roof", **two), runtime("rain on a tin roof", **two)
    np.testing.assert_array_equal(out.audios, ref.audios)
    np.testing.assert_array_equal(out.scores, ref.scores)
    # every session bound and the denoising loop kept in bound buffers, as on CUDA
    bound = AudioLDM2Runtime.load(tiny_artifacts, shared_arena=True, device_loop=True)
    reference = AudioLDM2Runtime.load(tiny_artifacts, device_loop=True)
    np.testing.assert_array_equal(bound("rain", **KW).audios, reference("rain", **KW).audios)
    assert shared.health()["shared_arena"] == sorted(shared.health()["components"])  # every component on it
    assert runtime.health()["shared_arena"] == []  # the CPU's default: an arena each
    names = AudioLDM2Runtime.load(tiny_artifacts, shared_arena=["vae_decoder", "vocoder"])
    assert names.health()["shared_arena"] == ["vae_decoder", "vocoder"]
    np.testing.assert_array_equal(names("rain", **KW).audios, runtime("rain", **KW).audios)
    assert AudioLDM2Runtime.load(tiny_artifacts, shared_arena="vocoder").health()["shared_arena"] == ["vocoder"]


def test_the_decode_stage_is_on_the_arena_by_default_on_cuda_and_names_pick_theirs(tiny_artifacts):
    """Which sessions join the shared arena (the selection alone: this machine has no CUDA provider): by default the
    decode stage's with the default CUDA provider (run BN), none on the CPU or with providers given; True every
    component; names those; unknown names are refused by load."""
    from audioldm2_trt.runtime.backends.ort import default_shared_arena
    from audioldm2_trt.runtime.pipeline import SESSION_NAMES as every

    cuda = OrtSessionFactory.__new__(OrtSessionFactory)  # a CUDA factory's selection state, without CUDA
    cuda.device, cuda._default_cuda = Device.parse("cuda"), True
    assert {n for n in every if cuda._arena_selector(default_shared_arena(True))(n)} == {
        "vae_decoder", "vocoder", "clap_features", "clap_audio"}
    assert default_shared_arena(False) is False  # the CPU, or providers given
    assert {n for n in every if cuda._arena_selector(True)(n)} == set(every)
    assert not any(cuda._arena_selector(False)(n) for n in every)
    assert {n for n in every if cuda._arena_selector(["vocoder", "unet"])(n)} == {"vocoder", "unet"}
    cpu = OrtSessionFactory("cpu")
    assert cpu.arena is None and not any(cpu.on_shared_arena(n) for n in every)
    one = OrtSessionFactory("cpu", shared_arena="vocoder")  # one name as a string, as load takes it
    assert {n for n in every if one.on_shared_arena(n)} == {"vocoder"}
    with pytest.raises(InvalidRequestError, match=r"shared_arena names unknown components \['vocodr'\]"):
        AudioLDM2Runtime.load(tiny_artifacts, shared_arena=["vocodr"])


def test_on_cuda_captured_sessions_may_share_the_arena_only_in_the_decode_stage(monkeypatch):
    """On CUDA a session that captures CUDA graphs may share the arena only if it is one of the decode stage's (checked
    at full size since the runtime's buffers are its own there, runs BJ-BM); another captured one is refused — with
    CLAP's text branch on it two runtimes at once gave wrong audio (runs BD-BE) and none is checked since — and the
    error names it and the remedy. Sessions run uncaptured may share it; True only with every session outside the
    decode stage uncaptured. None and False pass, the CPU takes any choice (no captured graphs there), and the
    diagnosis switch lifts the rule."""
    from audioldm2_trt.runtime.backends import shared_arena as arena_module
    from audioldm2_trt.runtime.backends.ort import CAPTURED_ON_ARENA_CHECKED
    from audioldm2_trt.runtime.pipeline import SESSION_NAMES, captured_except

    check, cuda = OrtSessionFactory.check_shared_arena_choice, Device.parse("cuda")
    decode = ("vae_decoder", "vocoder", "clap_features", "clap_audio")
    assert CAPTURED_ON_ARENA_CHECKED == set(decode)
    for graphs in ("auto", True, False, captured_except(decode)):
        check(cuda, None, graphs)
        check(cuda, False, graphs)
        check(cuda, decode, graphs)  # the decode stage, captured or not
        check(cuda, "vocoder", graphs)
    for graphs in ("auto", True, ["t5_encoder", "unet"]):
        with pytest.raises(InvalidRequestError, match=re.escape("shared_arena ['t5_encoder']: on CUDA only the decode "
                                                                "stage's sessions may share the arena with CUDA graphs")
                           + r".*runs BD-BI.*runs BJ-BN.*captured_except\(\['t5_encoder'\]\).*bench --uncaptured "
                             r"t5_encoder"):
            check(cuda, ["vocoder", "t5_encoder"], graphs)
    check(cuda, ["vocoder", "t5_encoder"], captured_except(["t5_encoder"]))  # t5_encoder uncaptured: allowed
    for graphs in (True, captured_except(())):  # CLAP's text branch captured: refused
        with pytest.raises(InvalidRequestError, match=re.escape("shared_arena ['clap_text']")):
            check(cuda, ["vocoder", "clap_text"], graphs)
    check(cuda, ["vocoder", "clap_text", "projection"], "auto")  # uncaptured by default: allowed
    for graphs in ("auto", True, captured_except(decode), ["vocoder", "unet"]):
        with pytest.raises(InvalidRequestError, match=re.escape("shared_arena=True on CUDA needs every session "
                                                                "outside the decode stage uncaptured")):
            check(cuda, True, graphs)
    check(cuda, True, False)
    check(cuda, True, decode)
    check(cuda, True, [n for n in SESSION_NAMES if n in decode])
    check(Device.parse("cpu"), True, "auto")
    check(Device.parse("cpu"), ["clap_text", "t5_encoder"], "auto")
    monkeypatch.setattr(arena_module, "ALLOW_ON_CUDA", True)
    check(cuda, True, "auto")


def test_a_session_on_the_arena_never_queues_its_runs(tiny_artifacts, monkeypatch):
    """Rule 1 with the loops' queued steps: a replay asked not to wait (``wait=False``) returns before its graph has
    run only off the arena; on it the run is waited for, so the arena's lock is never released while its graph may
    still run (another session would be handed the same blocks). The queueing itself is CUDA's, so here the session
    is a CPU one given a stand-in stream and a graph id, and ONNX Runtime's run options are read back."""
    from audioldm2_trt.runtime.backends import ort_session

    factory = OrtSessionFactory("cpu", shared_arena=True)
    plain = factory.create("projection", tiny_artifacts / "projection.onnx")
    feeds = {i.name: np.ones([d if isinstance(d, int) else 2 for d in i.shape],
                             np.int64 if "int64" in i.type else np.float32) for i in plain._session.get_inputs()}
    seen = []
    monkeypatch.setattr(OrtSession, "_run_options", lambda self, graph_id: factory.ort.RunOptions())
    waited = {}
    for arena in (None, factory.arena):
        session = OrtSession("projection", plain._session, factory.ort, factory.device, bind=True, cuda_graphs=False,
                             arena=arena, stream=object())
        bound = session.private_buffers(feeds)
        session.cuda_graphs, bound.graph_id, bound.runs = True, 7, ort_session.CAPTURE_RUNS  # as if captured
        original = session._session

        class Spy:
            def run_with_iobinding(self, binding, ro):
                try:
                    seen.append(ro.get_run_config_entry(ort_session.NO_WAIT_OPTION))
                except RuntimeError:  # the key not set
                    seen.append(None)
                return original.run_with_iobinding(binding, ro)

        session._session = Spy()
        waited[arena is not None] = session.replay(bound, {}, wait=False)
        session.stream = None  # a stand-in: nothing to release
        assert factory.arena.captured is (arena is not None)  # a graph run on the arena marks it
        session.close()  # ... until the session closes (the arena is the process's)
    assert waited == {False: False, True: True}
    assert seen == ["1", None]
    assert not factory.arena.captured


def test_shared_arena_is_refused_where_it_does_not_apply(tiny_artifacts):
    with pytest.raises(InvalidRequestError, match="shared_arena applies to backend 'ort' with the default provider; "
                                                  "got backend 'ort', providers given"):
        AudioLDM2Runtime.load(tiny_artifacts, shared_arena=True, providers=["CPUExecutionProvider"])
    with pytest.raises(BackendError, match="shared_arena applies to the default CPU or CUDA provider only"):
        OrtSessionFactory("cpu", providers=["CPUExecutionProvider"], shared_arena=True)


def test_no_session_joins_the_arena_after_one_of_its_graphs_was_captured(tiny_artifacts):
    """Rule 2: a later session's long-lived buffers could land in a captured graph's memory. The CPU captures no
    graph, so a session on the arena is marked as on CUDA after its first graph run (``OrtSession._execute``)."""
    factory = OrtSessionFactory("cpu", shared_arena=True)
    assert factory.arena is shared_arena(factory.ort, Device.parse("cpu"))  # one arena per device and process
    plain = factory.create("projection", tiny_artifacts / "projection.onnx")  # joins before any capture
    capturer = OrtSession("projection", plain._session, factory.ort, factory.device, bind=True, cuda_graphs=False,
                          arena=factory.arena)  # as the factory makes it on CUDA
    factory.arena.mark_captured(capturer)
    try:
        with pytest.raises(BackendError, match=r"projection: cannot join the shared arena of cpu: a CUDA graph of a "
                                               r"session on it has been captured already.*shared_arena=False"):
            factory.create("projection", tiny_artifacts / "projection.onnx")
    finally:
        capturer.close()
    assert not factory.arena.captured  # closed, its graphs with it: a session may join again
    assert factory.create("projection", tiny_artifacts / "projection.onnx").stats.shared_arena


def test_the_default_keeps_a_session_off_an_arena_captured_already(tiny_artifacts, monkeypatch):
    """The default's side of rule 2: a runtime loaded at the default (on CUDA the decode stage on the arena) while
    another of the process that has served is open keeps an arena per session, and says so in its sessions' stats,
    where an explicit choice raises (the test above); once that one has closed, the arena takes sessions again. On
    the CPU the default is no arena, so the default's state is set by hand on a factory with an arena; the sessions
    are made for real."""
    factory = OrtSessionFactory("cpu", shared_arena=["projection"])
    monkeypatch.setattr(factory, "_arena_chosen", False)  # as shared_arena=None resolves on CUDA
    assert factory.on_shared_arena("projection") and not factory.on_shared_arena("vocoder")
    plain = factory.create("projection", tiny_artifacts / "projection.onnx")
    assert plain.stats.shared_arena
    joined = OrtSession("projection", plain._session, factory.ort, factory.device, bind=True, cuda_graphs=False,
                        arena=factory.arena)  # as the factory makes it on CUDA
    factory.arena.mark_captured(joined)
    try:
        assert not factory.on_shared_arena("projection")
        kept_out = factory.create("projection", tiny_artifacts / "projection.onnx")
        assert not kept_out.stats.shared_arena
        kept_out.close()  # a session off the arena closing changes nothing
        assert factory.arena.captured and not factory.on_shared_arena("projection")
    finally:
        joined.close()
    assert factory.on_shared_arena("projection")
    assert factory.create("projection", tiny_artifacts / "projection.onnx").stats.shared_arena


def test_a_run_on_the_arena_waits_for_its_lock(tiny_artifacts, runtime):
    """Rule 1: runs on one arena never overlap — a run waits while another holds the arena's lock."""
    factory = OrtSessionFactory("cpu", shared_arena=True)
    plain = factory.create("projection", tiny_artifacts / "projection.onnx")
    session = OrtSession("projection", plain._session, factory.ort, factory.device, bind=True, cuda_graphs=False,
                         arena=factory.arena)  # as the factory makes it on CUDA
    rng = np.random.default_rng(0)
    feeds = {i.name: np.ones([d if isinstance(d, int) else 2 for d in i.shape], np.int64) if "int64" in i.type
             else rng.standard_normal([d if isinstance(d, int) else 2 for d in i.shape]).astype(np.float32)
             for i in plain._session.get_inputs()}
    expected = plain.run(feeds)
    done = threading.Event()
    result = {}

    def run():
        result.update(session.run(feeds))
        done.set()

    with factory.arena.lock:
        thread = threading.Thread(target=run)
        thread.start()
        assert not done.wait(0.5), "the run went ahead while another held the arena's lock"
    thread.join(10)
    assert done.is_set()
    for name, value in expected.items():
        np.testing.assert_array_equal(result[name], value)


def test_memory_pattern_is_off_on_cuda_only_and_leaves_outputs_alone(tiny_artifacts):
    assert default_mem_pattern(Device.parse("cuda:1")) is False and default_mem_pattern(Device.parse("cpu")) is True
    on, off = OrtSessionFactory("cpu"), OrtSessionFactory("cpu", mem_pattern=False)
    assert on.mem_pattern is True and off.mem_pattern is False
    feeds = {"latents": np.random.default_rng(1).standard_normal((1, 8, 64, 16)).astype(np.float32)}
    for name, value in off.create("vae_decoder", tiny_artifacts / "vae_decoder.onnx").run(feeds).items():
        np.testing.assert_array_equal(value, on.create("vae_decoder", tiny_artifacts / "vae_decoder.onnx").run(feeds)[name])


def test_packed_weights_config_plans_the_weights_as_one_block(tiny_artifacts, capfd):
    """PACKED_CONFIG with the memory pattern on is what makes ONNX Runtime plan a session's initializers as one block
    (its log says it "statically allocates" them); without it, each is allocated on its own. A key that ONNX Runtime
    does not know would be ignored silently, so this asks its log. On the CPU, as on CUDA, the outputs are the same."""
    import onnxruntime as ort

    from audioldm2_trt.runtime.backends.ort import PACKED_CONFIG

    feeds = {"latents": np.random.default_rng(1).standard_normal((1, 8, 64, 16)).astype(np.float32)}
    outputs = {}
    for packed in (False, True):
        opts = ort.SessionOptions()
        opts.enable_mem_pattern = True
        opts.log_severity_level = 1  # INFO: the session's initializer plan
        for key, value in (PACKED_CONFIG if packed else {}).items():
            opts.add_session_config_entry(key, value)
        capfd.readouterr()
        session = ort.InferenceSession(str(tiny_artifacts / "vae_decoder.onnx"), opts,
                                       providers=["CPUExecutionProvider"])
        log = capfd.readouterr().err
        assert ("SessionStateInitializer statically allocates" in log) is packed, log[-2000:]
        outputs[packed] = session.run(None, feeds)[0]
    np.testing.assert_allclose(outputs[True], outputs[False], rtol=1e-5, atol=1e-6)


def test_packed_weights_apply_to_the_default_cuda_provider_only(tiny_artifacts):
    with pytest.raises(BackendError, match=r"packed_weights applies to the default CUDA provider only \(device cpu\)"):
        OrtSessionFactory("cpu", packed_weights=True)
    with pytest.raises(InvalidRequestError, match="packed_weights applies to backend 'ort' with the default provider; "
                                                  "got backend 'ort', providers given"):
        AudioLDM2Runtime.load(tiny_artifacts, packed_weights=["unet"], providers=["CPUExecutionProvider"])
    runtime = AudioLDM2Runtime.load(tiny_artifacts)  # CPU: ONNX Runtime's own allocation, prepacking on
    assert not any(c["packed_weights"] for c in runtime.health()["components"].values())


def test_packed_weights_leave_out_nhwc_convolutions(tiny_artifacts):
    """Which sessions pack their weights on CUDA (the selection alone: this machine has no CUDA provider). NhwcConv
    nodes (named by the manifest's fused ops) and prefer_nhwc need ONNX Runtime's prepacking: True leaves them out,
    naming one is an error; the default is the text stack, the ranking components and a UNet without NhwcConv."""
    from audioldm2_trt.runtime.artifacts import COMPONENTS as every
    from audioldm2_trt.runtime.artifacts import Artifacts, load_artifacts
    from audioldm2_trt.runtime.backends.ort import ASSUMED_NHWC, PACKED_WEIGHTS
    from audioldm2_trt.runtime.backends.ort_options import COMPONENT_PROVIDER_OPTIONS

    art = load_artifacts(tiny_artifacts)
    assert art.nhwc_components == frozenset()  # fp32 artefacts: plain convolutions
    manifest = {**art.manifest, "components": {**art.manifest["components"],
                                               "unet": {"fp16": {"fused": {"NhwcConv": 67, "GroupNorm": 61}}},
                                               "vae_decoder": {"fp16": {"fused": {"NhwcConv": 29}}},
                                               "gpt2": {"fp16": {"fused": {}}}, "projection": {"fp16": None}}}
    nhwc = Artifacts(art.folder, manifest).nhwc_components
    assert nhwc == {"unet", "vae_decoder"}

    factory = OrtSessionFactory.__new__(OrtSessionFactory)  # a CUDA factory's selection state, without CUDA
    factory.device, factory._default_cuda = Device.parse("cuda"), True
    factory.component_options = COMPONENT_PROVIDER_OPTIONS  # the fp16 defaults: the vocoder has prefer_nhwc
    every = (*every, "unet_context")  # the fused UNet's context graph: matrix products only, packed by default
    default = factory._packed_selector(None, nhwc)
    assert {n for n in every if default(n)} == PACKED_WEIGHTS - {"unet"} == {
        "clap_text", "t5_encoder", "projection", "gpt2", "unet_context", "clap_features", "clap_audio"}
    nchw_unet = factory._packed_selector(None, frozenset({"vae_decoder"}))  # export --unet-layout nchw
    assert {n for n in every if nchw_unet(n)} == PACKED_WEIGHTS
    # a factory not told which components have NhwcConv (validate, scripts) assumes the default export's
    assert ASSUMED_NHWC == {"unet", "vae_decoder"}
    unknown = factory._packed_selector(None, ASSUMED_NHWC)
    assert {n for n in every if unknown(n)} == PACKED_WEIGHTS - {"unet"}
    allowed = factory._packed_selector(True, nhwc)
    assert {n for n in every if allowed(n)} == set(every) - {"unet", "vae_decoder", "vocoder"}
    assert not any(factory._packed_selector(False, nhwc)(n) for n in every)
    for name in ("unet", "vocoder"):
        with pytest.raises(BackendError, match=rf"packed_weights \['{name}'\]: their NHWC convolutions"):
            factory._packed_selector(["gpt2", name], nhwc)


def test_factory_for_artifacts_takes_their_precision_and_nhwc_components(tiny_artifacts, monkeypatch):
    """``OrtSessionFactory.for_artifacts`` (what load, validate and the scripts use) passes the folder's own precision
    and NhwcConv components, not the constructor's defaults (fp16, ``ASSUMED_NHWC``)."""
    from audioldm2_trt.runtime.artifacts import load_artifacts
    from audioldm2_trt.runtime.backends.ort import ASSUMED_NHWC
    from audioldm2_trt.runtime.backends.ort_options import COMPONENT_PROVIDER_OPTIONS, FP32_COMPONENT_PROVIDER_OPTIONS

    seen = []
    selector = OrtSessionFactory._packed_selector
    monkeypatch.setattr(OrtSessionFactory, "_packed_selector",
                        lambda self, packed, needs: seen.append(needs) or selector(self, packed, needs))
    art = load_artifacts(tiny_artifacts)
    assert art.precision == "fp32" and art.nhwc_components == frozenset()
    assert ASSUMED_NHWC and COMPONENT_PROVIDER_OPTIONS  # the defaults differ from this folder's
    factory = OrtSessionFactory.for_artifacts(art, "cpu", threads=1)
    assert seen == [frozenset()]
    assert factory.component_options == FP32_COMPONENT_PROVIDER_OPTIONS  # fp32: not the fp16 per-component options
    assert factory.threads == 1
    default = OrtSessionFactory("cpu")  # the constructor's defaults, for contrast
    assert seen[1] == ASSUMED_NHWC and default.component_options == COMPONENT_PROVIDER_OPTIONS


def test_the_concurrency_check_script_on_the_cpu(tiny_artifacts, tmp_path):
    """scripts/shared_arena_check.py (which tests/test_gpu.py runs on CUDA) on the CPU, with the decode stage's
    sessions on the shared arena: two runtimes from two threads at once, one and two waveforms, one runtime from two
    threads, and a runtime with one loaded after it had served give each request exactly what it gives alone (the
    CPU is deterministic here), and the CPU takes the choices CUDA refuses."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "scripts" / "shared_arena_check.py"), "--artifacts",
                        str(tiny_artifacts), "--device", "cpu", "--request", "tiny", "--decode-arena-uncaptured",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=root / "scripts")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "shared_arena_check.json").read_text())
    assert res["shared_arena"] == ["vae_decoder", "vocoder", "clap_features", "clap_audio"]  # the choice, as given
    assert set(res["runs"][0]) == {"two_runtimes", "two_runtimes_two_waveforms", "one_runtime",
                                   "loaded_after_a_capture"}
    for label, check in res["runs"][0].items():
        assert check["errors"] == [] and max(check["worst_against_alone"]) < 1e-6, (label, check)
        assert max(check["worst_rows_matched"]) < 1e-6 and check["order_differs"] == [], (label, check)
        # as each runtime's health() has it (no features session on the CPU); nothing is captured on the CPU, so
        # every check's runtimes join
        assert all(on == ["clap_audio", "vae_decoder", "vocoder"] for on in check["on_arena"]), (label, check)
    assert res["refused"] == {"all": None, "one_name": None}


def test_the_concurrency_check_tells_a_reordered_ranking_from_wrong_audio():
    """scripts/shared_arena_check.together_vs_alone on two stand-in runtimes with known outputs (the second call
    of a seed is the one made while both threads run): runtime 0's seed 3 comes back with its two waveforms
    exact but ranked the other way round, as when CLAP's scores of the pair move past each other; runtime 1's seed 8
    comes back in its order with one waveform wrong. The check keeps the ranked comparison, and its row-matched
    comparison clears the first and catches the second; order_differs names the first with both runs' scores of the
    same waveforms."""
    import importlib
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        check = importlib.import_module("shared_arena_check")
    finally:
        sys.path.pop(0)

    class StandIn:
        def __init__(self, reorder_seed=None, wrong_seed=None):
            self.calls, self.reorder_seed, self.wrong_seed = {}, reorder_seed, wrong_seed

        def __call__(self, seed, num_waveforms_per_prompt, **request):
            assert num_waveforms_per_prompt == 2 and request == {"prompt": "rain"}
            self.calls[seed] = self.calls.get(seed, 0) + 1
            rows = np.random.default_rng(seed).standard_normal((2, 64)).astype(np.float32)
            scores = np.array([0.060, 0.059], np.float32)
            if self.calls[seed] == 2 and seed == self.reorder_seed:
                rows, scores = rows[[1, 0]], np.array([0.061, 0.058], np.float32)
            if self.calls[seed] == 2 and seed == self.wrong_seed:
                rows = rows.copy()
                rows[1] += 0.5
            return SimpleNamespace(audios=rows, scores=scores)

    res = check.together_vs_alone([StandIn(reorder_seed=3), StandIn(wrong_seed=8)], {"prompt": "rain"}, 2)
    rows = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    assert res["errors"] == []
    assert res["worst_against_alone"][0] == pytest.approx(check.rel_l2(rows[[1, 0]], rows))
    assert res["worst_against_alone"][0] > 1.0 and res["worst_rows_matched"][0] == 0.0
    wrong = np.random.default_rng(8).standard_normal((2, 64)).astype(np.float32)
    assert res["worst_rows_matched"][1] == pytest.approx(0.5 * np.sqrt(64) / np.linalg.norm(wrong), rel=1e-5)
    assert res["order_differs"] == [{"thread": 0, "seed": 3, "alone_scores": pytest.approx([0.060, 0.059]),
                                     "together_scores": pytest.approx([0.058, 0.061])}]


def test_clap_score_spread_scores_a_pair_in_either_order_the_same(tmp_path):
    """scripts/clap_score_spread.py on the tiny config: a pair of waveforms and the same pair in the other order get
    the same two scores, swapped (the gap's sign flips, the spread across files is the gap), and every score is a
    cosine similarity computed through the runtime's CLAP features."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    rows = np.random.default_rng(0).standard_normal((2, 16000 * 2)).astype(np.float32) * 0.1
    np.savez(tmp_path / "a.npz", two=rows)
    np.savez(tmp_path / "b.npz", two=rows[[1, 0]])
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "scripts" / "clap_score_spread.py"), "--config", "tiny", "--audio",
                        str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=root / "scripts")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "clap_score_spread.json").read_text())
    a, b = res["files"]["a.npz"], res["files"]["b.npz"]
    assert b["scores"] == pytest.approx(a["scores"][::-1], abs=1e-6) and all(-1 <= v <= 1 for v in a["scores"])
    assert a["gap"] != 0 and b["gap"] == pytest.approx(-a["gap"], abs=1e-6)
    assert res["score_spread_across_files"] == pytest.approx([abs(a["gap"])] * 2, abs=1e-6)
    assert res["gap_signs"] == [-1, 1]


def test_the_decode_stage_choice_serves_every_device_and_ranking_choice(tiny_artifacts):
    """The decode stage's four names (the choice CUDA takes with captured sessions) load on the CPU too, where CLAP's
    features have no session, and with ranking=False, where CLAP's audio branch has none either: what has no session
    is left out, health() names what is on the arena, and the audio is the same as with one arena each. A name that
    is no component is still refused."""
    decode = ["vae_decoder", "vocoder", "clap_features", "clap_audio"]
    kw = dict(num_inference_steps=3, audio_length_in_s=2.0, seed=4)
    plain = AudioLDM2Runtime.load(tiny_artifacts)
    shared = AudioLDM2Runtime.load(tiny_artifacts, shared_arena=decode)
    assert shared.health()["shared_arena"] == ["clap_audio", "vae_decoder", "vocoder"]
    out, ref = shared("rain", num_waveforms_per_prompt=2, **kw), plain("rain", num_waveforms_per_prompt=2, **kw)
    np.testing.assert_array_equal(out.audios, ref.audios)
    np.testing.assert_array_equal(out.scores, ref.scores)
    no_ranking = AudioLDM2Runtime.load(tiny_artifacts, shared_arena=decode, ranking=False)
    assert no_ranking.health()["shared_arena"] == ["vae_decoder", "vocoder"]
    np.testing.assert_array_equal(no_ranking("rain", **kw).audios, plain("rain", **kw).audios)
    with pytest.raises(InvalidRequestError, match=r"shared_arena names unknown components \['clap_feature'\]"):
        AudioLDM2Runtime.load(tiny_artifacts, shared_arena=["vocoder", "clap_feature"])
