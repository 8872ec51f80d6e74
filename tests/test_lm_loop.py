"""GPT-2's passes on the device (runtime/lm_loop.py) against the host loop they replace, and the append graph
against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from audioldm2_trt.runtime.errors import InvalidRequestError

from .conftest import CpuStream, _has, needs_export


def _append_session():
    import onnxruntime as ort

    from audioldm2_trt.runtime.pipeline import LM_APPEND_GRAPH

    return ort.InferenceSession(str(LM_APPEND_GRAPH), providers=["CPUExecutionProvider"])


@pytest.mark.skipif(not _has("onnx"), reason="needs onnx (the export extra) to rebuild the graph")
def test_shipped_lm_append_graph_is_the_one_the_builder_makes():
    import onnx

    from audioldm2_trt.export.lm_append_graph import GRAPH_FILE, build_lm_append

    assert onnx.load(str(GRAPH_FILE)).graph == build_lm_append().graph


@pytest.mark.parametrize("last", [0, 4, 7])
def test_append_graph_writes_the_state_after_last_and_advances_it(last):
    rng = np.random.default_rng(last)
    x = rng.standard_normal((3, 9, 5)).astype(np.float32)
    mask = (rng.random((3, 9)) < 0.5).astype(np.int64)
    hidden = rng.standard_normal((3, 1, 5)).astype(np.float32)
    x_next, mask_next, last_next = _append_session().run(
        None, {"inputs_embeds": x, "attention_mask": mask, "last": np.array([last], np.int64), "hidden": hidden})
    want_x, want_mask = x.copy(), mask.copy()
    want_x[:, last + 1] = hidden[:, 0]
    want_mask[:, last + 1] = 1
    np.testing.assert_array_equal(x_next, want_x)
    np.testing.assert_array_equal(mask_next, want_mask)
    assert last_next.tolist() == [last + 1]


def _projected(rows: int, length: int, dim: int, seed: int):
    """inputs_embeds [rows, length, dim] and a mask with each row's padding at its end, as the projection gives."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, length, dim)).astype(np.float32)
    mask = np.ones((rows, length), np.int64)
    for r in range(rows):
        mask[r, length - r % 3:] = 0
    return x, mask


@pytest.fixture(scope="module")
def loop_runtime(tiny_artifacts):
    from audioldm2_trt.runtime import AudioLDM2Runtime

    rt = AudioLDM2Runtime.load(tiny_artifacts, device="cpu", device_loop=True)
    yield rt
    rt.close()


@needs_export
@pytest.mark.parametrize("queued", [False, True], ids=["each-run-waited", "queued-cpu-stand-in"])
def test_device_passes_equal_the_host_loop_bit_for_bit(loop_runtime, queued):
    """Shapes in the order (2, 5), (4, 11), (2, 5): the second call of a shape reuses its buffers and graphs, and its
    result must not carry anything of the calls before. ``meanwhile`` is called once a call: where the passes are
    queued, after the event behind the last is recorded and before it is waited for."""
    from audioldm2_trt.runtime.conditioning import generate_lm_states
    from audioldm2_trt.runtime.lm_loop import LmLoop

    rt = loop_runtime
    assert rt.health()["lm_loop"] and not rt.health()["lm_queued"]  # the CPU has no stream
    gpt2, consts = rt._sessions["gpt2"], rt.constants
    dim, new, positions = consts["lm_dim"], consts["max_new_tokens"], consts["lm_max_positions"]
    stream = CpuStream()
    append = rt._lm_append
    if queued:
        gpt2.stream = append.stream = stream
    try:
        loop = LmLoop(gpt2, append, positions, max_shapes=4)
        for seed, (rows, length) in enumerate([(2, 5), (4, 11), (2, 5)]):
            x, mask = _projected(rows, length, dim, seed)
            called = []
            got = loop.generate(x, mask, new, meanwhile=lambda: called.append((stream.recorded, stream.waited)))
            assert called == ([(seed + 1, seed)] if queued else [(0, 0)])
            want = generate_lm_states(gpt2, x, mask, new, True, positions)
            assert got.shape == (rows, new, dim)
            np.testing.assert_array_equal(got, want)
    finally:
        gpt2.stream = append.stream = None  # not CudaStreams: nothing to release
    assert (stream.recorded, stream.waited) == ((3, 3) if queued else (0, 0))


@needs_export
def test_shapes_past_max_shapes_are_left_to_the_host_loop(loop_runtime):
    from audioldm2_trt.runtime.lm_loop import LmLoop

    rt = loop_runtime
    dim, new = rt.constants["lm_dim"], rt.constants["max_new_tokens"]
    loop = LmLoop(rt._sessions["gpt2"], rt._lm_append, rt.constants["lm_max_positions"], max_shapes=1)
    assert loop.generate(*_projected(2, 5, dim, 0), new) is not None
    called = []
    assert loop.generate(*_projected(2, 30, dim, 1), new, meanwhile=lambda: called.append(1)) is None  # a second
    assert called == []  # (rows, width): no buffers, and the host work is left to the caller (encode_text)
    assert loop.generate(*_projected(2, 6, dim, 2), new) is not None  # the first width again (lm_buffer rounds to 16)


@needs_export
def test_requests_with_and_without_the_device_passes_get_the_same_conditioning(tiny_artifacts, loop_runtime):
    """And the same initial latents, which the device passes' request draws while they run (``encode_text``'s
    meanwhile): the seed's PCG64 draw either way."""
    from audioldm2_trt.runtime import AudioLDM2Runtime

    host = AudioLDM2Runtime.load(tiny_artifacts, device="cpu", device_loop=True, lm_loop=False)
    try:
        assert not host.health()["lm_loop"]
        kw = dict(prompt=["a dog barking", "rain on a tin roof at night"], negative_prompt="noise",
                  num_inference_steps=3, audio_length_in_s=2.0, seed=3)
        pa, pb = loop_runtime.prepare(**kw), host.prepare(**kw)
        np.testing.assert_array_equal(pa.cond.generated, pb.cond.generated)
        np.testing.assert_array_equal(pa.cond.t5, pb.cond.t5)
        want = np.random.default_rng(3).standard_normal(pa.latents.shape, dtype=np.float32)
        assert pa.latents.shape[0] == 2 and pa.seed == pb.seed == 3
        np.testing.assert_array_equal(pa.latents, want)
        np.testing.assert_array_equal(pb.latents, want)
    finally:
        host.close()


@needs_export
def test_lm_loop_where_it_cannot_apply_is_an_error(tiny_artifacts):
    from audioldm2_trt.runtime import AudioLDM2Runtime

    with pytest.raises(InvalidRequestError, match="lm_loop needs the device loop"):
        AudioLDM2Runtime.load(tiny_artifacts, device="cpu", lm_loop=True)  # the CPU's default: the host loop


def test_deferred_runs_once_and_keeps_its_error_for_result():
    """encode_text's ``meanwhile``: called inside GPT-2's call, it must not raise there (that would blame GPT-2);
    ``result()`` raises the computation's own error, and a second call does not compute again."""
    from audioldm2_trt.runtime.conditioning import Deferred

    runs = []
    ok = Deferred(lambda: runs.append(1) or len(runs))
    ok()
    ok()
    assert ok.result() == 1 and runs == [1]

    def bad():
        runs.append(2)
        raise ValueError("latents of the wrong shape")

    failing = Deferred(bad)
    failing()  # does not raise
    with pytest.raises(ValueError, match="wrong shape"):
        failing.result()
    with pytest.raises(ValueError, match="wrong shape"):
        failing.result()
    assert runs == [1, 2]
