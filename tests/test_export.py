"""Export stage: every component against PyTorch, the GPT-2 graph against diffusers' loop, sources, bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from audioldm2_trt.runtime.artifacts import COMPONENTS, load_artifacts
from audioldm2_trt.runtime.errors import ArtifactError

from .conftest import needs_export

pytestmark = needs_export


def test_every_component_matches_pytorch(tiny_pipe, tiny_artifacts):
    from audioldm2_trt.export.validate import FP32_TOLERANCE, validate

    checks = validate(tiny_artifacts, pipe=tiny_pipe)
    assert {c.component for c in checks} == set(COMPONENTS)
    assert {(c.shape.batch, c.shape.frames) for c in checks} == {(1, 16), (3, 25)}
    assert {c.shape.seq for c in checks if c.component == "unet"} == {16}  # T5 5 and 12 → the runtime's bucket
    worst = max(checks, key=lambda c: c.rel_l2)
    assert worst.rel_l2 <= FP32_TOLERANCE, worst


def test_validate_checks_only_the_components_named(tiny_pipe, tiny_artifacts):
    from audioldm2_trt.export.validate import FP32_TOLERANCE, validate
    from audioldm2_trt.runtime.errors import ExportError

    checks = validate(tiny_artifacts, pipe=tiny_pipe, components=["vocoder", "projection"])
    assert {c.component for c in checks} == {"vocoder", "projection"}
    assert max(c.rel_l2 for c in checks) <= FP32_TOLERANCE
    with pytest.raises(ExportError, match=r"components \['unet2'\] are not in .* \(it holds clap_text, t5_encoder"):
        validate(tiny_artifacts, pipe=tiny_pipe, components=["vocoder", "unet2"])


def test_validation_feeds_the_unet_its_t5_bucket_as_the_runtime_does(tiny_pipe, tiny_artifacts):
    import torch

    from audioldm2_trt.export.components import BY_NAME, SampleShape, sample_inputs
    from audioldm2_trt.export.validate import as_runtime_feeds

    consts = load_artifacts(tiny_artifacts).constants
    raw = sample_inputs(BY_NAME["unet"], consts, SampleShape(batch=3, seq=5, frames=16), seed=1)
    fed = as_runtime_feeds("unet", raw)
    states, mask = fed["encoder_hidden_states_1"], fed["encoder_attention_mask_1"]
    assert states.shape[1] == mask.shape[1] == 16  # t5_bucket(5)
    assert torch.equal(states[:, :5], raw["encoder_hidden_states_1"]) and not states[:, 5:].any()
    assert torch.equal(mask[:, :5], raw["encoder_attention_mask_1"]) and not mask[:, 5:].any()
    assert fed["sample"] is raw["sample"]
    # padding with mask 0 leaves the UNet's output as it was (what makes the bucket a pure runtime choice)
    unet = BY_NAME["unet"].build(tiny_pipe, consts).eval()
    with torch.no_grad():
        torch.testing.assert_close(unet(*fed.values()), unet(*raw.values()), rtol=1e-4, atol=1e-5)
    t5 = sample_inputs(BY_NAME["t5_encoder"], consts, SampleShape(batch=1, seq=5, frames=16))
    assert as_runtime_feeds("t5_encoder", t5) is t5


def test_validation_pads_clap_tokens_to_the_entry_length_multiple(tiny_pipe, tiny_artifacts):
    """An fp16 CLAP text entry with a "length_multiple" (``CLAP_TEXT_MEA``) is validated on the token rows the
    runtime gives it: padded with <pad> = 1 and mask 0 to that multiple; CLAP's output is the same either way."""
    import torch

    from audioldm2_trt.export.components import BY_NAME, SampleShape, sample_inputs
    from audioldm2_trt.export.validate import as_runtime_feeds

    consts = load_artifacts(tiny_artifacts).constants
    raw = sample_inputs(BY_NAME["clap_text"], consts, SampleShape(batch=3, seq=5, frames=16), seed=2)
    assert as_runtime_feeds("clap_text", raw) is raw
    fed = as_runtime_feeds("clap_text", raw, 8)
    ids, mask = fed["input_ids"], fed["attention_mask"]
    assert ids.shape == mask.shape == (3, 8)
    assert torch.equal(ids[:, :5], raw["input_ids"]) and (ids[:, 5:] == 1).all()
    assert torch.equal(mask[:, :5], raw["attention_mask"]) and not mask[:, 5:].any()
    clap = BY_NAME["clap_text"].build(tiny_pipe, consts).eval()
    with torch.no_grad():
        torch.testing.assert_close(clap(*fed.values()), clap(*raw.values()), rtol=1e-5, atol=1e-6)


def test_manifest_records_what_the_runtime_needs(tiny_artifacts):
    art = load_artifacts(tiny_artifacts)
    m = art.manifest
    assert m["precision"] == "fp32" and m["source"] == {"kind": "random", "config": "tiny", "seed": 0}
    assert set(m["versions"]) == {"torch", "diffusers", "transformers", "onnx"}
    unet = m["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "encoder_hidden_states_1", "encoder_attention_mask_1"]
    assert unet["dynamic_axes"]["sample"] == {"0": "batch", "2": "frames"}
    assert len(m["content_hash"]) == 64 and m["constants"]["hop_length"] == 160


def test_onnx_graph_inputs_are_the_declared_ones(tiny_artifacts):
    import onnx

    from audioldm2_trt.export.components import BY_NAME

    for name in COMPONENTS:
        model = onnx.load(str(tiny_artifacts / f"{name}.onnx"), load_external_data=False)
        assert [i.name for i in model.graph.input] == [t.name for t in BY_NAME[name].inputs], name
        assert [o.name for o in model.graph.output] == [t.name for t in BY_NAME[name].outputs], name


def test_clap_text_at_real_length_equals_diffusers_max_length_padding(tiny_pipe, tiny_artifacts):
    """diffusers pads CLAP input to model_max_length; the runtime feeds the real length."""
    import torch

    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    prompts = ["a hammer hitting a wooden surface", "thunder"]
    session = OrtSessionFactory("cpu").create("clap_text", tiny_artifacts / "clap_text.onnx")
    real = tiny_pipe.tokenizer(prompts, padding=True, return_tensors="np")
    padded = tiny_pipe.tokenizer(prompts, padding="max_length", max_length=tiny_pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
    assert padded.input_ids.shape[1] > real.input_ids.shape[1]
    got = session.run({"input_ids": real.input_ids.astype(np.int64), "attention_mask": real.attention_mask.astype(np.int64)})
    with torch.no_grad():
        ref = tiny_pipe.text_encoder.get_text_features(padded.input_ids, attention_mask=padded.attention_mask)
    ref = getattr(ref, "pooler_output", ref).numpy()
    assert np.linalg.norm(got["text_embeds"] - ref) / np.linalg.norm(ref) < 1e-5


def _diffusers_gpt2_reference(pipe, embeds, mask, n):
    import torch

    with torch.no_grad():
        return pipe.generate_language_model(embeds, attention_mask=mask, max_new_tokens=n).numpy()


@pytest.mark.parametrize("graph", ["step", "unrolled"])
def test_gpt2_graph_equals_diffusers_generation_loop(tiny_pipe, tiny_artifacts, tmp_path, graph):
    """Both GPT-2 graphs, as the runtime drives them (``generate_lm_states``), against diffusers' own loop; the
    step graph's buffer (32 wide here, for 11 + 8 positions) is padded with 13 unused positions."""
    import torch

    from audioldm2_trt.export.components import GPT2_GRAPHS, pipeline_constants
    from audioldm2_trt.export.onnx_export import export_component
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory
    from audioldm2_trt.runtime.conditioning import generate_lm_states

    consts = pipeline_constants(tiny_pipe)
    path = tiny_artifacts / "gpt2.onnx"
    if graph == "unrolled":  # the default artefact is "step"; export the other graph alone
        export_component(tiny_pipe, consts, "gpt2", tmp_path, spec=GPT2_GRAPHS["unrolled"])
        path = tmp_path / "gpt2.onnx"
    assert load_artifacts(tiny_artifacts).gpt2_graph == "step"
    session = OrtSessionFactory("cpu").create("gpt2", path)
    gen = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 11, tiny_pipe.language_model.config.n_embd, generator=gen)
    mask = torch.ones(2, 11, dtype=torch.int64)
    mask[1, 7:10] = 0  # padding inside the sequence, before the T5 stream's EOS, as projection makes it
    ref = _diffusers_gpt2_reference(tiny_pipe, embeds, mask, 8)
    got = generate_lm_states(session, embeds.numpy(), mask.numpy(), 8, stepwise=graph == "step",
                             max_positions=consts["lm_max_positions"])
    assert got.shape == ref.shape == (2, 8, embeds.shape[-1])
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_gpt2_wrapper_handles_gpt2model_and_lmhead_alike(tiny_pipe):
    """diffusers #12630: real checkpoints hold a GPT2Model; our wrapper takes either."""
    import torch
    from transformers import GPT2Model

    from audioldm2_trt.export.wrappers import Gpt2GenerateKV, Gpt2GenerateRecompute

    lm_head = tiny_pipe.language_model
    trunk = GPT2Model(lm_head.config).eval()
    trunk.load_state_dict(lm_head.transformer.state_dict())
    x = torch.randn(2, 9, lm_head.config.n_embd, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[0, 4:6] = 0
    with torch.no_grad():
        a = Gpt2GenerateKV(trunk, 8)(x, mask)
        b = Gpt2GenerateKV(lm_head, 8)(x, mask)
        c = Gpt2GenerateRecompute(trunk, 8)(x, mask)
    assert torch.equal(a, b)
    assert torch.linalg.norm(a - c) / torch.linalg.norm(c) < 1e-5


def test_export_from_a_saved_diffusers_folder(tiny_pipe, tiny_artifacts, tmp_path):
    """save_pretrained → export --model FOLDER gives the same graphs as the in-memory export."""
    from audioldm2_trt.export.onnx_export import export
    from audioldm2_trt.export.sources import Source

    tiny_pipe.save_pretrained(tmp_path / "pipe")
    out = export(Source(model=str(tmp_path / "pipe")), tmp_path / "art")
    m = load_artifacts(out).manifest
    ref = load_artifacts(tiny_artifacts).manifest
    assert m["source"]["kind"] == "local"
    assert m["constants"] == ref["constants"] and m["scheduler"] == ref["scheduler"]
    for name in ("unet", "vae_decoder", "vocoder", "gpt2", "t5_encoder"):
        assert m["components"][name]["sha256"] == ref["components"][name]["sha256"], name
    from tokenizers import Tokenizer

    for which in ("clap", "t5"):
        a = Tokenizer.from_file(str(out / m["tokenizers"][which]["file"]))
        b = Tokenizer.from_file(str(tiny_artifacts / ref["tokenizers"][which]["file"]))
        text = "birds chirping in a forest at dawn"
        assert a.encode(text).ids == b.encode(text).ids


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "audioldm2_trt.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--random-weights", "huge"], "unknown random-weights config 'huge'; choose one of audioldm2, tiny"),
    (["--model", "/nonexistent/pipe"], "model folder '/nonexistent/pipe' does not exist"),
])
def test_bad_source_is_one_line_error(args, message, tmp_path):
    r = _cli("export", *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"audioldm2-trt export: error: {message}"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial"))


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "notpipe").mkdir()
    (tmp_path / "notpipe" / "readme.txt").write_text("hello")
    r = _cli("export", "--model", str(tmp_path / "notpipe"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "is not a diffusers pipeline folder: it has no model_index.json" in r.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    r = _cli("export", "--model", str(tmp_path / "other"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "holds a 'StableDiffusionPipeline', not an AudioLDM2Pipeline" in r.stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_and_occupied_outputs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("export", "--random-weights", "tiny", "--out", str(blocker / "out"))
    assert r.returncode == 2 and "cannot create output folder" in r.stderr and len(r.stderr.splitlines()) == 1
    r = _cli("export", "--random-weights", "tiny", "--out", str(blocker))
    assert r.returncode == 2 and "exists and is not a folder" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    r = _cli("export", "--random-weights", "tiny", "--out", str(tmp_path / "full"))
    assert r.returncode == 2 and "is not empty; pass --overwrite" in r.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_failed_export_leaves_nothing_that_looks_valid(tiny_pipe, tmp_path, monkeypatch):
    from audioldm2_trt.export import onnx_export
    from audioldm2_trt.export.sources import Source

    real = onnx_export.export_component

    def failing(pipe, consts, name, folder, precision, **kwargs):
        if name == "vae_decoder":
            raise RuntimeError("simulated failure half-way")
        return real(pipe, consts, name, folder, precision, **kwargs)

    monkeypatch.setattr(onnx_export, "export_component", failing)
    with pytest.raises(RuntimeError, match="half-way"):
        onnx_export.export(Source(random_config="tiny"), tmp_path / "art", pipe=tiny_pipe)
    assert not (tmp_path / "art").exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifacts(tmp_path / "art")


def test_large_component_is_saved_with_external_data(tiny_pipe, tmp_path, monkeypatch):
    """Components over the protobuf limit go to one <name>.onnx.data file the runtime loads transparently."""
    from audioldm2_trt.export import onnx_export
    from audioldm2_trt.export.components import pipeline_constants
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    entry = onnx_export.export_component(tiny_pipe, pipeline_constants(tiny_pipe), "vocoder", tmp_path)
    assert entry["external_data"] == "vocoder.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocoder.onnx", "vocoder.onnx.data"]
    assert (tmp_path / "vocoder.onnx").stat().st_size < 100_000 < (tmp_path / "vocoder.onnx.data").stat().st_size
    session = OrtSessionFactory("cpu").create("vocoder", tmp_path / "vocoder.onnx")
    mel = np.random.default_rng(0).standard_normal((1, 1, 8, 64)).astype(np.float32)
    import torch

    with torch.no_grad():
        ref = tiny_pipe.vocoder(torch.from_numpy(mel[:, 0])).numpy()
    got = session.run({"mel": mel})["waveform"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


@needs_export
@pytest.mark.parametrize("fuse, precision, message", [
    (("projection",), "fp16",
     "--fuse projection: fused recipes exist for unet, vae_decoder, gpt2, t5_encoder, clap_text, vocoder only"),
    (("unet",), "fp32", "--fuse applies to --precision fp16"),
])
def test_fuse_option_errors_name_the_problem(tmp_path, fuse, precision, message):
    from audioldm2_trt.export.onnx_export import export
    from audioldm2_trt.export.sources import Source
    from audioldm2_trt.runtime.errors import ExportError

    with pytest.raises(ExportError, match=message):
        export(Source(random_config="tiny"), tmp_path / "out", precision=precision, fuse=fuse)
    assert not (tmp_path / "out").exists()


@needs_export
@pytest.mark.parametrize("fuse, layout, message", [
    ((), "nchw", "unet_layout 'nchw' applies to the fused UNet"),         # --fuse none: plain convolutions already
    (("vae_decoder",), "nchw", "unet_layout 'nchw' applies to the fused UNet"),
    (None, "nhwc8", "unet_layout 'nhwc8' is not one of nhwc, nchw"),
])
def test_unet_layout_errors_name_the_problem(tmp_path, fuse, layout, message):
    from audioldm2_trt.export.onnx_export import export
    from audioldm2_trt.export.sources import Source
    from audioldm2_trt.runtime.errors import ExportError

    with pytest.raises(ExportError, match=message):
        export(Source(random_config="tiny"), tmp_path / "out", precision="fp16", fuse=fuse, unet_layout=layout)
    assert not (tmp_path / "out").exists()


@needs_export
@pytest.mark.parametrize("precision, fuse, expected", [
    ("fp16", None, ("unet", "vae_decoder", "gpt2", "t5_encoder", "clap_text", "vocoder")),  # fp16: every fused recipe
    ("fp16", (), ()),                         # --fuse none
    ("fp16", ("unet",), ("unet",)),
    ("fp32", None, ()),
])
def test_fused_components_default_to_the_fused_recipes_for_fp16_only(precision, fuse, expected):
    from audioldm2_trt.export.onnx_export import fused_components

    assert fused_components(precision, fuse) == expected


@needs_export
def test_export_cli_fuse_none_means_no_fusion(monkeypatch, tmp_path):
    """`--fuse none` reaches export() as an empty tuple, no --fuse as None (the precision's default)."""
    from audioldm2_trt.export import cli as export_cli

    seen = []
    monkeypatch.setattr("audioldm2_trt.export.onnx_export.export",
                        lambda *a, **k: seen.append((k["fuse"], k["unet_layout"])) or tmp_path)
    parser = argparse.ArgumentParser()
    export_cli.add_commands(parser.add_subparsers())
    for argv, want in ((["--fuse", "none"], ((), "nhwc")), ([], (None, "nhwc")), (["--fuse", "unet"], (("unet",), "nhwc")),
                       (["--unet-layout", "nchw"], (None, "nchw"))):
        args = parser.parse_args(["export", "--random-weights", "tiny", "--out", str(tmp_path), "--precision", "fp16",
                                  *argv])
        export_cli.run_export(args)
        assert seen[-1] == want, argv


@needs_export
def test_unknown_gpt2_graph_is_refused_before_anything_is_written(tmp_path):
    from audioldm2_trt.export.onnx_export import export
    from audioldm2_trt.export.sources import Source
    from audioldm2_trt.runtime.errors import ExportError

    with pytest.raises(ExportError, match="gpt2_graph 'looped' is not one of step, unrolled"):
        export(Source(random_config="tiny"), tmp_path / "out", gpt2_graph="looped")
    assert not (tmp_path / "out").exists()


def _assert_log_mel_close(got, ref, loud_db=80):
    """dB, per row. A float32 DFT's round-off sits ~140 dB under a row's peak: bins within 80 dB of the peak agree
    to float32 rounding, the faintest (a pure tone's far bins at -97 dB) to a few hundredths of a dB. Resampled rows
    (``loud_db=70``): the band above the 16 kHz rate's Nyquist holds only the resampler's stopband, 60–80 dB under
    the peak there, where any float32 resampler's rounding shows (soxr's own output, through a float64 filter, moves
    those bins by 6e-4 dB)."""
    for g, r in zip(got, ref):
        err = np.abs(g - r)
        loud = r > r.max() - loud_db
        assert err[loud].max() <= 2e-3 and err.max() <= 0.05, (err[loud].max(), err.max())


def _features_graph(pipe_like, consts, folder):
    """The clap_features graph exported through the real export path, and a CPU session of it."""
    from audioldm2_trt.export.onnx_export import export_component
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    folder.mkdir(exist_ok=True)
    entry = export_component(pipe_like, consts, "clap_features", folder)
    return OrtSessionFactory("cpu").create("clap_features", folder / entry["file"])


@pytest.mark.parametrize("config", ["audioldm2", "tiny"])
def test_clap_features_graph_matches_librosa_and_transformers(config, tmp_path):
    """The exported features graph (soxr's resampler as polyphase filters, fitting, DFT as a strided convolution)
    against diffusers' ranking path: ``librosa.resample`` to CLAP's rate, then transformers' ClapFeatureExtractor,
    which computes in float64 — a short row (repeat-padded), rows longer than and exactly CLAP's 10 s (cut), a quiet
    row, a tone."""
    import types

    librosa = pytest.importorskip("librosa")
    import transformers

    from .test_audio import _config

    cfg, audio_rate = _config(config), 16000
    fe = transformers.ClapFeatureExtractor(**cfg)
    consts = {"one": 1, "vae_scale": 1, "hop_length": 1, "sampling_rate": audio_rate,  # (the first three size dims only)
              "clap_frames": int(fe.nb_max_samples // fe.hop_length + 1), "clap_mel_bins": fe.feature_size}
    graph = _features_graph(types.SimpleNamespace(feature_extractor=fe), consts, tmp_path / "g")
    rng, t = np.random.default_rng(4), np.arange(4 * audio_rate) / audio_rate
    rows = [0.3 * rng.standard_normal(int(2.5 * audio_rate)), 0.3 * rng.standard_normal(int(10.24 * audio_rate)),
            0.3 * rng.standard_normal(10 * audio_rate), 1e-3 * rng.standard_normal(7 * audio_rate),
            0.5 * np.sin(2 * np.pi * 440 * t)]
    for row in rows:
        audio = row.astype(np.float32)[None]
        at_clap_rate = librosa.resample(audio, orig_sr=audio_rate, target_sr=cfg["sampling_rate"])
        first = at_clap_rate[:, : fe.nb_max_samples]  # a longer row's first 10 s (transformers: a random offset)
        ref = fe(list(first), sampling_rate=cfg["sampling_rate"], return_tensors="np").input_features
        got = graph.run({"audio": audio})["input_features"]
        assert got.shape == ref.shape == (1, 1, consts["clap_frames"], cfg["feature_size"])
        assert ref.max() - ref.min() > 20  # a real spectrum, not the floor
        _assert_log_mel_close(got, ref, loud_db=70)


@pytest.mark.parametrize("padding", ["repeatpad", "repeat", "pad"])
def test_features_graph_fits_rows_as_the_host_does(padding):
    """The graph's fitting (one gather, its indices computed from the row length on the device) against the host's
    ``ClapFeatures._padded`` for each padding mode of transformers' extractor: rows shorter than CLAP's window (whole
    copies, a partial one or zeros), as long, and longer (cut)."""
    import torch
    import transformers

    from audioldm2_trt.export.wrappers import ClapLogMel
    from audioldm2_trt.runtime.audio import ClapFeatures

    from .test_audio import _config

    cfg = {**_config("tiny"), "padding": padding}
    graph, host = ClapLogMel(transformers.ClapFeatureExtractor(**cfg), 16000), ClapFeatures.from_config(cfg)
    for length in (1000, 170_000, host.max_samples, host.max_samples + 7):
        row = np.random.default_rng(length).standard_normal(length).astype(np.float32)
        got = graph.fit_and_pad(torch.tensor(row[None]))[0].numpy()
        np.testing.assert_array_equal(got, host._padded(row))


def test_ranking_with_the_features_graph_equals_the_host_features(runtime):
    """rank_per_prompt with the artefacts' clap_features session (what the runtime uses on a GPU) against the
    numpy features (its CPU path): same order, same scores to float32 rounding."""
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory
    from audioldm2_trt.runtime.ranking import clap_input_features, rank_per_prompt

    rng = np.random.default_rng(6)
    audios = (0.2 * rng.standard_normal((6, 40000))).astype(np.float32)
    audios[1] *= 0.01
    audios[4] = 0.4 * np.sin(2 * np.pi * 300 * np.arange(40000) / 16000)
    text = rng.standard_normal((2, runtime.constants["clap_dim"])).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    graph = OrtSessionFactory("cpu").create("clap_features", runtime.artifacts.component_file("clap_features"))
    clap_audio, fe = runtime._sessions["clap_audio"], runtime._clap_features
    _assert_log_mel_close(clap_input_features(audios, 16000, fe, graph), clap_input_features(audios, 16000, fe))
    host = rank_per_prompt(audios, text, 3, 16000, fe, clap_audio)
    on_graph = rank_per_prompt(audios, text, 3, 16000, fe, clap_audio, graph)
    assert np.array_equal(host[0], on_graph[0])
    np.testing.assert_allclose(on_graph[1], host[1], atol=1e-5)
    assert runtime.health()["ranking_features"] == "host"  # the CPU keeps numpy's FFT (faster there)
    assert "clap_features" not in runtime.health()["components"]  # and does not open the graph
