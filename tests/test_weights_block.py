"""The weights block (runtime/backends/weights_block.py): the initializers read from the ONNX file's bytes without the
onnx package, handed to ONNX Runtime from one buffer, the same audio; which components get one. The CUDA side (the
session reading the device block, freed with it) is in test_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest

from audioldm2_trt.runtime import AudioLDM2Runtime
from audioldm2_trt.runtime.backends.base import Device
from audioldm2_trt.runtime.backends.ort import OrtSessionFactory
from audioldm2_trt.runtime.backends.ort_options import COMPONENT_PROVIDER_OPTIONS
from audioldm2_trt.runtime.backends.weights_block import ALIGNMENT, WeightsBlock, read_initializers
from audioldm2_trt.runtime.errors import BackendError, InvalidRequestError

from .conftest import needs_export

REQUEST = dict(prompt="rain on a tin roof", negative_prompt="noise", num_inference_steps=4, audio_length_in_s=2.0,
               seed=3)


def _onnx_arrays(path) -> dict:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t, base_dir=str(path.parent))
            for t in onnx.load(str(path), load_external_data=False).graph.initializer}


@needs_export
def test_read_initializers_gives_the_bytes_onnx_reads(tiny_artifacts):
    """Every initializer of the tiny UNet with raw data, its shape and bytes as the onnx package reads them."""
    path = tiny_artifacts / "unet.onnx"
    expected = _onnx_arrays(path)
    found = read_initializers(path)
    assert len(found) > 100 and {i.name for i in found} <= set(expected)
    raw = {name for name, a in expected.items() if a.dtype != bool}
    assert {i.name for i in found} == raw  # torch.onnx writes raw bytes for every tensor of a supported type
    data = path.read_bytes()
    for init in found:
        array = expected[init.name]
        assert init.dims == array.shape and init.nbytes == array.nbytes
        assert data[init.offset:init.offset + init.nbytes] == array.tobytes()


@needs_export
def test_read_initializers_follows_external_data(tiny_artifacts, tmp_path):
    """Weights saved as external data (how large components are written): located in the data file, same bytes."""
    import onnx

    model = onnx.load(str(tiny_artifacts / "vae_decoder.onnx"))
    onnx.save(model, str(tmp_path / "vae.onnx"), save_as_external_data=True, location="vae.onnx.data",
              size_threshold=1024)
    expected = _onnx_arrays(tmp_path / "vae.onnx")
    found = read_initializers(tmp_path / "vae.onnx")
    external = [i for i in found if i.file.name == "vae.onnx.data"]
    assert external and len(found) == len(expected)
    for init in found:
        with open(init.file, "rb") as f:
            f.seek(init.offset)
            assert f.read(init.nbytes) == expected[init.name].tobytes()


@needs_export
def test_block_lays_the_weights_out_aligned_and_session_gives_the_same_output(tiny_artifacts):
    """On the CPU the block is host memory: each weight starts on a 256-byte boundary, and a session made with the
    block's values computes what the one made from the file does."""
    import onnxruntime as ort

    path = tiny_artifacts / "vae_decoder.onnx"
    block = WeightsBlock(path, ort)
    try:
        addresses = [v.data_ptr() for v in block.values.values()]
        assert all(a % ALIGNMENT == 0 for a in addresses) and len(set(addresses)) == len(addresses)
        assert block.nbytes >= sum(i.nbytes for i in block.initializers)
        expected = _onnx_arrays(path)
        for name, value in block.values.items():
            np.testing.assert_array_equal(value.numpy(), expected[name])
        feeds = {"latents": np.random.default_rng(0).standard_normal((1, 8, 32, 16)).astype(np.float32)}
        plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        opts = ort.SessionOptions()
        block.add_to(opts)
        with_block = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_array_equal(with_block, plain)
    finally:
        block.close()
    assert block.values == {}


@needs_export
def test_block_memory_outlives_close_while_onnx_runtime_holds_its_weights(tiny_artifacts):
    """The DLPack structures and the block's memory stay until ONNX Runtime releases the last tensor over them (the
    DLPack deleter), not merely until ``close``: an I/O binding kept elsewhere keeps the session, and with it the
    weights, alive after the runtime closed it. (Run BF: freed on ``close``, ONNX Runtime later read a freed
    structure — "A dlpack structure must have a deleter" — and the process aborted.) Once the session goes, the
    memory goes, and no structure is left behind."""
    import gc

    import onnxruntime as ort

    from audioldm2_trt.runtime.backends import dlpack as wb

    path = tiny_artifacts / "vae_decoder.onnx"
    before = set(wb._LIVE)
    block = WeightsBlock(path, ort)
    memory = block._memory
    assert len(set(wb._LIVE) - before) == len(block.values) > 0
    opts = ort.SessionOptions()
    block.add_to(opts)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {"latents": np.random.default_rng(0).standard_normal((1, 8, 32, 16)).astype(np.float32)}
    assert np.isfinite(session.run(None, feeds)[0]).all()  # the weights in use
    binding = session.io_binding()  # holds the ONNX Runtime session
    block.close()
    del session, opts
    gc.collect()
    assert block.values == {} and memory.host is not None  # ONNX Runtime still holds the weights
    assert set(wb._LIVE) - before
    del binding
    gc.collect()
    assert memory.host is None and set(wb._LIVE) == before  # released by ONNX Runtime's deleter calls


@needs_export
def test_runtime_with_weights_blocks_gives_the_same_audio(tiny_artifacts):
    audio, blocks = {}, {}
    for option in (False, True):
        rt = AudioLDM2Runtime.load(tiny_artifacts, weights_block=option)
        try:
            blocks[option] = {n for n, c in rt.health()["components"].items() if c["weights_block"]}
            audio[option] = rt(**REQUEST).audios
        finally:
            rt.close()
    assert blocks[False] == set() and {"unet", "vae_decoder", "vocoder", "gpt2"} <= blocks[True]
    np.testing.assert_array_equal(audio[True], audio[False])


def test_which_components_get_a_block():
    """The default on CUDA: the components with NhwcConv nodes that are not packed; never a prefer_nhwc one (the
    vocoder's weights would be held twice) nor a packed one; nothing on the CPU unless asked; not with providers
    given."""
    factory = OrtSessionFactory.__new__(OrtSessionFactory)  # a CUDA factory's selection state, without CUDA
    factory.device, factory._default_cuda, factory.providers_given = Device.parse("cuda"), True, False
    factory.component_options = COMPONENT_PROVIDER_OPTIONS  # the fp16 defaults: the vocoder has prefer_nhwc
    nhwc = frozenset({"unet", "vae_decoder"})
    factory._packed = factory._packed_selector(None, nhwc)
    names = ("clap_text", "t5_encoder", "projection", "gpt2", "unet", "unet_context", "vae_decoder", "vocoder",
             "clap_features", "clap_audio", "solver_step", "lm_append")
    default = factory._block_selector(None, nhwc)
    assert {n for n in names if default(n)} == {"unet", "vae_decoder"}
    assert {n for n in names if factory._block_selector(None, frozenset({"vae_decoder"}))(n)} == {"vae_decoder"}
    every = factory._block_selector(True, nhwc)
    assert {n for n in names if every(n)} == {"unet", "vae_decoder", "solver_step", "lm_append"}
    assert not any(factory._block_selector(False, nhwc)(n) for n in names)
    with pytest.raises(BackendError, match=r"weights_block \['vocoder'\]: prefer_nhwc copies"):
        factory._block_selector(["unet", "vocoder"], nhwc)
    with pytest.raises(BackendError, match=r"weights_block \['gpt2'\]: their weights are packed already"):
        factory._block_selector(["gpt2"], nhwc)
    assert not any(OrtSessionFactory("cpu")._block(n) for n in names)  # the CPU default: none
    with pytest.raises(BackendError, match="weights_block applies to the default CPU or CUDA provider only"):
        OrtSessionFactory("cpu", providers=["CPUExecutionProvider"], weights_block=True)


@needs_export
def test_load_refuses_weights_block_where_it_does_not_apply(tiny_artifacts):
    with pytest.raises(InvalidRequestError, match="weights_block applies to backend 'ort' with the default provider; "
                                                  "got backend 'ort', providers given"):
        AudioLDM2Runtime.load(tiny_artifacts, weights_block=True, providers=["CPUExecutionProvider"])


@needs_export
def test_load_names_unknown_components_in_the_weight_options(tiny_artifacts):
    """A misspelt component in ``weights_block`` or ``packed_weights`` is an error naming it, not a silent no-op; one
    name as a string is that name."""
    for option in ("weights_block", "packed_weights"):
        with pytest.raises(InvalidRequestError, match=rf"{option} names unknown components \['unett'\]; components: "):
            AudioLDM2Runtime.load(tiny_artifacts, **{option: ["unett", "vae_decoder"]})
    rt = AudioLDM2Runtime.load(tiny_artifacts, weights_block="vae_decoder")
    try:
        assert {n for n, c in rt.health()["components"].items() if c["weights_block"]} == {"vae_decoder"}
    finally:
        rt.close()
