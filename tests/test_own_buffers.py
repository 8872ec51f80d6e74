"""The runtime's bound buffers in memory of its own (runtime/backends/dlpack.py ``own_value``), which ``OrtSession``
uses where ONNX Runtime's Python allocator would take them from the shared arena (a CUDA device whose arena is
registered: measured on the H100, run BI, ``scripts/ortvalue_allocator_probe.py``).

On the GPU it is checked by ``scripts/shared_arena_check.py``. Here, on the CPU (host memory through the same DLPack
path): a value holds exactly its source, is freed when ONNX Runtime lets it go, and a runtime whose every buffer is
made that way gives exactly the audio of one whose buffers are ONNX Runtime's.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from audioldm2_trt.runtime import AudioLDM2Runtime
from audioldm2_trt.runtime.backends import dlpack
from audioldm2_trt.runtime.backends import shared_arena as shared_arena_module
from audioldm2_trt.runtime.backends.base import Device

KW = dict(num_inference_steps=3, audio_length_in_s=2.5, seed=5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.int32])
def test_own_value_holds_a_copy_of_its_source_until_onnx_runtime_lets_it_go(dtype):
    import onnxruntime as ort

    before = set(dlpack._LIVE)
    source = (np.arange(24).reshape(2, 3, 4) * 3 - 7).astype(dtype)
    value = dlpack.own_value(ort, source.shape, source.dtype, None, source=source)
    assert value.shape() == [2, 3, 4] and value.device_name().lower() == "cpu"
    source += 1  # a copy, not a view of the caller's array
    np.testing.assert_array_equal(value.numpy(), source - 1)
    value.update_inplace(np.full((2, 3, 4), 9, dtype))  # the runtime's way of writing into a bound input
    np.testing.assert_array_equal(value.numpy(), np.full((2, 3, 4), 9, dtype))
    (memory,) = {entry[2] for key, entry in dlpack._LIVE.items() if key not in before}
    assert memory.host is not None
    del value
    gc.collect()
    assert set(dlpack._LIVE) == before and memory.host is None  # ONNX Runtime's deleter freed it


def test_own_value_names_what_it_cannot_hold():
    import onnxruntime as ort

    with pytest.raises(TypeError, match="dtype bool"):
        dlpack.own_value(ort, (2,), np.bool_, None)
    with pytest.raises(ValueError, match=r"source \(3,\) float32 does not match the buffer \(2,\) float32"):
        dlpack.own_value(ort, (2,), np.float32, None, source=np.zeros(3, np.float32))
    empty = dlpack.own_value(ort, (0, 4), np.float16, None)  # a zero-size buffer is a valid one
    assert empty.shape() == [0, 4]


def test_only_a_cuda_device_with_its_arena_registered_gives_python_values_from_the_arena(monkeypatch):
    cpu = Device.parse("cpu")
    assert not shared_arena_module.python_values_from_arena(cpu)
    monkeypatch.setitem(shared_arena_module._ARENAS, "cpu", object())  # a CPU arena: ONNX Runtime's CPU values
    assert not shared_arena_module.python_values_from_arena(cpu)      # stay on the heap (checked here, run BF)
    gpu0, gpu1 = Device("cuda", 0), Device("cuda", 1)
    assert not shared_arena_module.python_values_from_arena(gpu0)
    monkeypatch.setitem(shared_arena_module._ARENAS, str(gpu0), object())  # as shared_arena() registers it
    assert shared_arena_module.python_values_from_arena(gpu0)
    assert not shared_arena_module.python_values_from_arena(gpu1)  # one arena per device


def test_a_runtime_with_its_buffers_in_memory_of_its_own_gives_the_same_audio(tiny_artifacts, monkeypatch):
    """Every session bound and the denoising loop on bound buffers (``device_loop=True``), as on CUDA; once with ONNX
    Runtime's buffers, once with the runtime's own (the policy forced on for the CPU)."""
    reference = AudioLDM2Runtime.load(tiny_artifacts, device_loop=True)
    two = dict(KW, num_waveforms_per_prompt=2)
    expected = reference("rain on a tin roof", **KW), reference("a dog barks", **two)
    monkeypatch.setattr(shared_arena_module, "python_values_from_arena", lambda device: True)
    before = set(dlpack._LIVE)
    own = AudioLDM2Runtime.load(tiny_artifacts, device_loop=True)
    got = own("rain on a tin roof", **KW), own("a dog barks", **two)
    assert len(set(dlpack._LIVE) - before) > 10  # the buffers really are the runtime's own
    for out, ref in zip(got, expected):
        np.testing.assert_array_equal(out.audios, ref.audios)
    np.testing.assert_array_equal(got[1].scores, expected[1].scores)
    again = own("rain on a tin roof", **KW)  # the same buffers reused by the next request
    np.testing.assert_array_equal(again.audios, expected[0].audios)
    monkeypatch.setattr(shared_arena_module, "OWN_BUFFERS", False)  # the diagnosis switch: ONNX Runtime's again
    made = set(dlpack._LIVE)
    python = AudioLDM2Runtime.load(tiny_artifacts, device_loop=True)
    np.testing.assert_array_equal(python("a dog barks", **two).audios, expected[1].audios)
    assert set(dlpack._LIVE) - made == set()
    own.close()
    del own, got, again
    gc.collect()
    assert set(dlpack._LIVE) - before == set()  # all freed once the runtime closed


def test_own_buffers_are_made_at_a_new_shape_only_never_per_request(tiny_artifacts, monkeypatch):
    """One ``cuMemAlloc`` per buffer is cheap only if a warm request allocates none (a free can wait for the whole
    device): buffers are made with each new shape key — the first request, the first with two waveforms — and reused
    after."""
    from audioldm2_trt.runtime.backends import ort_session

    made = []
    original = ort_session.own_value
    monkeypatch.setattr(ort_session, "own_value", lambda *a, **k: (made.append(a[1]), original(*a, **k))[1])
    monkeypatch.setattr(shared_arena_module, "python_values_from_arena", lambda device: True)
    rt = AudioLDM2Runtime.load(tiny_artifacts, device_loop=True)
    counts = []
    for seed, waveforms in ((1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 1)):
        before = len(made)
        rt("rain", **dict(KW, seed=seed, num_waveforms_per_prompt=waveforms))
        counts.append(len(made) - before)
    assert counts[0] > 10 and counts[3] > 0  # the first request, and the first with two waveforms (new shapes)
    assert counts[1] == counts[2] == counts[4] == counts[5] == 0, counts
    rt.close()
