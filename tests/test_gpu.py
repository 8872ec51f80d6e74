"""The CUDA paths that the CPU cannot take: GPT-2's passes and the denoising steps queued on their streams, the
fp32 vocoder's captured graphs with two runtimes in one process, the weights block, runtimes driven at once and the
shared arena's refusal. Run wherever onnxruntime-gpu sees a GPU; skipped,
with the reason, elsewhere (CI has no GPU). Correctness only: speed is measured by scripts/, never here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import needs_export


def _cuda_reason() -> str | None:
    """Why the CUDA tests cannot run here, or None where they can."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "needs onnxruntime"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "needs onnxruntime-gpu (this onnxruntime has no CUDA execution provider)"
    from audioldm2_trt.runtime.backends.cuda_driver import cuda_device_count

    if not cuda_device_count():
        return "needs an NVIDIA GPU and its driver"
    return None


REASON = _cuda_reason()
needs_cuda = pytest.mark.skipif(REASON is not None, reason=REASON or "")
ROOT = Path(__file__).resolve().parent.parent
REQUEST = dict(prompt="a dog barking in the rain", negative_prompt="noise", num_inference_steps=6,
               audio_length_in_s=2.0, seed=4)


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def cuda_runtimes(tiny_artifacts):
    """The default runtime (both loops queued), one with GPT-2's passes on the host, one with every step waited for."""
    from audioldm2_trt.runtime import AudioLDM2Runtime

    made = {"default": AudioLDM2Runtime.load(tiny_artifacts, device="cuda"),
            "gpt2_on_host": AudioLDM2Runtime.load(tiny_artifacts, device="cuda", lm_loop=False),
            "step_by_step": AudioLDM2Runtime.load(tiny_artifacts, device="cuda", queued_steps=False, lm_loop=False)}
    yield made
    for rt in made.values():
        rt.close()


@needs_cuda
@needs_export
def test_queued_gpt2_passes_give_the_host_loops_conditioning(cuda_runtimes):
    rt, host = cuda_runtimes["default"], cuda_runtimes["gpt2_on_host"]
    assert rt.health()["lm_queued"] and not host.health()["lm_loop"]
    for _ in range(3):  # the first request captures the graphs; the later ones run queued
        a, b = rt.prepare(**REQUEST).cond, host.prepare(**REQUEST).cond
        np.testing.assert_array_equal(a.generated, b.generated)
        np.testing.assert_array_equal(a.t5, b.t5)
        np.testing.assert_array_equal(a.clap_text, b.clap_text)


@needs_cuda
@needs_export
def test_clap_text_and_projection_run_uncaptured_by_default_with_the_captured_conditioning(cuda_runtimes,
                                                                                           tiny_artifacts):
    """``cuda_graphs="auto"`` leaves CLAP's text branch and the projection uncaptured (``UNCAPTURED_BY_DEFAULT``, run
    BP: 12-14 MiB less peak memory for ~1 ms), the rest of the text stack captured; every session captured
    (``captured_except(())``) gives the same conditioning, bit for bit (fp32 tiny export: the same kernels)."""
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.bench import sessions_without_cuda_graphs
    from audioldm2_trt.runtime.pipeline import captured_except

    rt = cuda_runtimes["default"]
    every = AudioLDM2Runtime.load(tiny_artifacts, device="cuda", cuda_graphs=captured_except(()))
    try:
        for _ in range(5):  # past the capture runs of every session
            a, b = rt.prepare(**REQUEST).cond, every.prepare(**REQUEST).cond
            np.testing.assert_array_equal(a.generated, b.generated)
            np.testing.assert_array_equal(a.clap_text, b.clap_text)
            np.testing.assert_array_equal(a.t5, b.t5)
        default, captured = rt.health()["components"], every.health()["components"]
    finally:
        every.close()
    assert default["clap_text"]["graphs"] == default["projection"]["graphs"] == 0
    assert default["t5_encoder"]["graphs"] >= 1 and default["gpt2"]["graphs"] >= 1
    assert captured["clap_text"]["graphs"] >= 1 and captured["projection"]["graphs"] >= 1
    # what `bench` and benchmark.py report as run without a graph
    assert {"clap_text", "projection"} <= set(sessions_without_cuda_graphs({"components": default}))
    assert not {"clap_text", "projection"} & set(sessions_without_cuda_graphs({"components": captured}))


@needs_cuda
@needs_export
def test_queued_steps_give_the_step_by_step_loops_audio(cuda_runtimes):
    rt, stepwise = cuda_runtimes["default"], cuda_runtimes["step_by_step"]
    assert rt.health()["queued_steps"] and not stepwise.health()["queued_steps"]
    for _ in range(2):
        a, b = rt(**REQUEST).audios, stepwise(**REQUEST).audios
        assert np.isfinite(a).all() and rel_l2(a, b) < 1e-5  # fp32 tiny export: the same kernels, in another order


@needs_cuda
@needs_export
def test_two_fp32_vocoders_replay_their_graphs_after_other_batch_shapes(tiny_artifacts, tmp_path):
    """Runs AU–AV: with the exhaustive convolution search this sequence ended in CUDA error 700 (which ends the
    process: hence a process of its own); fp32 artefacts now search heuristically."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "vocoder_shapes_check.py"), "--artifacts",
                        str(tiny_artifacts), "--device", "cuda", "--sessions", "2", "--order", "1,4,2,1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "vocoder_shapes_check.json").read_text())["rows"]
    assert len(rows) == 8 and all(row["finite"] for row in rows)
    assert max(row["max_abs_diff_to_first"] for row in rows) < 1e-5


def _matmul_model(path: Path, weight: np.ndarray) -> None:
    """y = x @ w with w an initializer of the file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, cols])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


@needs_cuda
def test_a_cuda_session_reads_its_weights_from_the_block(tmp_path):
    """The session computes with the block's bytes: its output follows a change written into the block after the
    session was made (ONNX Runtime's CUDA MatMul keeps no copy of its own), and matches numpy before and after."""
    import onnxruntime as ort

    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    weight = np.random.default_rng(0).standard_normal((512, 768)).astype(np.float32)  # 1.5 MiB: over 1 MiB
    _matmul_model(tmp_path / "m.onnx", weight)
    factory = OrtSessionFactory("cuda", precision="fp32", weights_block=True, cuda_graphs=False)
    session = factory.create("vae_decoder", tmp_path / "m.onnx")  # a component that is not packed
    try:
        block = session.weights_block
        assert block is not None and set(block.values) == {"w"} and block.nbytes >= weight.nbytes
        assert session.stats.weights_block == block.nbytes
        x = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)
        np.testing.assert_allclose(session.run({"x": x})["y"], x @ weight, rtol=1e-4, atol=1e-4)
        doubled = (2 * weight).astype(np.float32)
        block._memory.device.copy_in(0, doubled.ctypes.data, doubled.nbytes)
        np.testing.assert_allclose(session.run({"x": x})["y"], x @ doubled, rtol=1e-4, atol=1e-4)
        assert isinstance(block.values["w"], ort.OrtValue) and block.values["w"].device_name() == "cuda"
    finally:
        session.close()
    assert block._memory.device is None  # freed with the session


@needs_cuda
@needs_export
def test_the_weights_block_gives_the_same_audio_on_cuda(tiny_artifacts):
    from audioldm2_trt.runtime import AudioLDM2Runtime

    audio = {}
    for option in (True, False):
        rt = AudioLDM2Runtime.load(tiny_artifacts, device="cuda", weights_block=option)
        try:
            blocks = {n for n, c in rt.health()["components"].items() if c["weights_block"]}
            assert bool(blocks) == option
            audio[option] = rt(**REQUEST).audios
        finally:
            rt.close()
    assert rel_l2(audio[True], audio[False]) < 1e-5, rel_l2(audio[True], audio[False])


@needs_cuda
@needs_export
@pytest.mark.parametrize("mode", ["default", "own_arenas", "decode_arena_uncaptured"])
def test_runtimes_driven_at_once_give_their_audio_alone_on_cuda(tiny_artifacts, tmp_path, mode):
    """In a process of its own (scripts/shared_arena_check.py): two runtimes driven from two threads at once, two
    waveforms (the ranking's sessions) and one, and one runtime from two threads, give each request the audio it
    gives alone — at the default (the decode stage's captured sessions on the shared arena, each check's runtimes
    loaded before either served and after the check before closed its own; a runtime loaded while one that has
    served is open keeps an arena per session, the default's fallback), with one arena per session, and with the
    decode stage's sessions uncaptured on the arena. Captured sessions outside the
    decode stage on the arena are refused (before the runtime's buffers were its own there, with the decode stage's
    captured on it the later runtime of such a pair got wrong audio, rel-L2 0.14-0.8, runs BF-BI; with CLAP's text
    branch too, runs BD-BE)."""
    extra = {"default": [], "own_arenas": ["--own-arenas"], "decode_arena_uncaptured": ["--decode-arena-uncaptured"]}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "shared_arena_check.py"), "--artifacts",
                        str(tiny_artifacts), "--device", "cuda", "--request", "tiny", "--out", str(tmp_path),
                        *extra[mode]], capture_output=True, text=True, timeout=600, cwd=ROOT / "scripts")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "shared_arena_check.json").read_text())
    decode = sorted(["vae_decoder", "vocoder", "clap_features", "clap_audio"])
    assert set(res["uncaptured"]) == (set(decode) if mode == "decode_arena_uncaptured" else set())
    run = res["runs"][0]
    on_arena = {label: check["on_arena"] for label, check in run.items()}
    if mode == "default":  # on the arena, each check's runtimes loaded after the last one's closed; off it, the
        # runtime loaded while one that has served is open
        assert on_arena == {"two_runtimes_two_waveforms": [decode, decode], "two_runtimes": [decode, decode],
                            "one_runtime": [decode], "loaded_after_a_capture": [decode, []]}, on_arena
    else:
        assert on_arena == {label: [decode if mode == "decode_arena_uncaptured" else []] * len(on)
                            for label, on in on_arena.items()}, on_arena
    for label, check in run.items():
        assert check["errors"] == [] and max(check["worst_against_alone"]) < 1e-5, (label, check)
        assert max(check["worst_rows_matched"]) < 1e-5 and check["order_differs"] == [], (label, check)
    for label, refusal in res["refused"].items():
        assert refusal is not None and refusal.startswith("InvalidRequestError: shared_arena") and \
            "runs BD-BI" in refusal, (label, refusal)


@needs_cuda
@needs_export
def test_two_runtimes_with_the_decode_stage_captured_on_the_arena_give_their_audio_alone_on_cuda(tiny_artifacts,
                                                                                                  tmp_path):
    """In a process of its own (scripts/shared_arena_check.py --decode-arena): two runtimes with the decode stage's
    captured sessions on the shared arena, chosen explicitly, loaded before either serves, driven from two threads at
    once with one waveform a request, give each request the waveform it gives alone. This is the choice that gave
    wrong audio while the runtime's buffers came from the arena (runs BF-BI); with buffers of its own it gave the
    right audio in runs BJ-BN, and it is the default since (the test above: two waveforms)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "shared_arena_check.py"), "--artifacts",
                        str(tiny_artifacts), "--device", "cuda", "--request", "tiny", "--decode-arena", "--waveforms",
                        "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT / "scripts")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "shared_arena_check.json").read_text())
    decode = sorted(["vae_decoder", "vocoder", "clap_features", "clap_audio"])
    assert res["shared_arena"] == ["vae_decoder", "vocoder", "clap_features", "clap_audio"]
    assert res["uncaptured"] == [] and res["buffers"] == "own"
    check = res["runs"][0]["two_runtimes_1_waveforms"]
    assert check["on_arena"] == [decode, decode], check
    assert check["errors"] == [] and max(check["worst_rows_matched"]) < 1e-5, check
    assert max(check["worst_against_alone"]) < 1e-5 and check["order_differs"] == [], check


@needs_cuda
@needs_export
def test_the_context_graph_queued_before_the_steps_gives_the_waited_loops_audio(tiny_artifacts, tmp_path):
    """With the UNet cut in two (its context graph, as the fused fp16 export has it) and the loop queued, the context
    graph's run is queued on the loop's stream without a wait (``unet_key_buffers``); the audio is the loop's where
    every run is waited for (``queued_steps=False``), over requests of other text shapes and step counts, and the
    first shapes again (their buffers, the plan's tables kept)."""
    from audioldm2_trt.runtime import AudioLDM2Runtime

    from .test_hoist_context import _hoisted_copy

    folder = _hoisted_copy(tiny_artifacts, tmp_path / "hoisted")
    queued = AudioLDM2Runtime.load(folder, device="cuda")
    waited = AudioLDM2Runtime.load(folder, device="cuda", queued_steps=False)
    calls = [REQUEST, dict(REQUEST, prompt="a bell rings three times in a very large and echoing stone hall"),
             dict(REQUEST, num_inference_steps=4, scheduler="ddim"), REQUEST, REQUEST]
    try:
        assert queued.health()["queued_steps"] and "unet_context" in queued.health()["components"]
        for call in calls:
            a, b = queued(**call).audios, waited(**call).audios
            assert np.isfinite(a).all() and rel_l2(a, b) < 1e-5  # fp32 tiny export: the same kernels
    finally:
        queued.close()
        waited.close()
