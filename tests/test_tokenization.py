"""Tokenisation equals what diffusers' pipeline feeds its encoders (transformers tokenizers)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from audioldm2_trt.runtime.tokenization import TextTokenizer, tokenize_prompts

from .conftest import needs_export

pytestmark = needs_export


def _ours(tiny_artifacts):
    return (TextTokenizer(tiny_artifacts / "tokenizer_clap.json", 77, 1, "CLAP"),
            TextTokenizer(tiny_artifacts / "tokenizer_t5.json", 77, 0, "T5"))


def test_prompt_and_negative_tokens_equal_transformers(tiny_pipe, tiny_artifacts):
    clap, t5 = _ours(tiny_artifacts)
    prompts = ["thunder", "an orchestra playing a slow sad melody"]
    negatives = ["low quality, noisy, distorted audio with a long negative prompt", ""]
    got = tokenize_prompts(clap, t5, prompts, negatives)
    ref_t5 = tiny_pipe.tokenizer_2(prompts, padding=True, truncation=True, max_length=77, return_tensors="np")
    np.testing.assert_array_equal(got.t5.input_ids, ref_t5.input_ids)
    np.testing.assert_array_equal(got.t5.attention_mask, ref_t5.attention_mask)
    width = ref_t5.input_ids.shape[1]
    ref_neg = tiny_pipe.tokenizer_2(negatives, padding="max_length", max_length=width, truncation=True,
                                    return_tensors="np")
    np.testing.assert_array_equal(got.t5_negative.input_ids, ref_neg.input_ids)  # the long one is truncated
    np.testing.assert_array_equal(got.t5_negative.attention_mask, ref_neg.attention_mask)
    ref_clap = tiny_pipe.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="np")
    np.testing.assert_array_equal(got.clap.input_ids, ref_clap.input_ids)


def test_truncation_keeps_the_closing_token(tiny_pipe, tiny_artifacts):
    clap, t5 = _ours(tiny_artifacts)
    long = ["footsteps on gravel " * 40]
    for ours, theirs in ((clap, tiny_pipe.tokenizer), (t5, tiny_pipe.tokenizer_2)):
        ref = theirs(long, truncation=True, max_length=77, return_tensors="np").input_ids
        got = ours.encode(long, warn=False).input_ids
        assert got.shape == (1, 77)
        np.testing.assert_array_equal(got, ref)


def test_random_tokenizers_are_the_same_in_every_process():
    code = ("from audioldm2_trt.export.tokenizer_builder import build_clap_tokenizer, build_t5_tokenizer;"
            "import hashlib;print(hashlib.sha256((build_clap_tokenizer(1000).to_str()"
            "+build_t5_tokenizer(1000).to_str()).encode()).hexdigest())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(3)}
    assert len(runs) == 1


@pytest.mark.parametrize("widths", [(14, 6), (5, 9), (7, 7)])
def test_prompts_and_negatives_stacked_negatives_first_and_padded(widths):
    """encode_text's [negatives; prompts] token rows: each set padded at its end to the wider one's length (ids with
    the pad id, mask 0), against np.pad; the inputs are left as they were."""
    from audioldm2_trt.runtime.conditioning import _stack
    from audioldm2_trt.runtime.tokenization import Tokens

    rng = np.random.default_rng(sum(widths))
    made = []
    for rows, width in zip((2, 3), widths):
        mask = np.ones((rows, width), np.int64)
        mask[0, width // 2:] = 0
        made.append(Tokens(rng.integers(3, 900, (rows, width)), mask))
    a, b = made
    copies = [t.input_ids.copy() for t in made]
    got = _stack(a, b, pad_id=1)
    width = max(widths)
    pad = lambda x, v: np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=v)  # noqa: E731
    np.testing.assert_array_equal(got.input_ids, np.concatenate([pad(b.input_ids, 1), pad(a.input_ids, 1)]))
    np.testing.assert_array_equal(got.attention_mask, np.concatenate([pad(b.attention_mask, 0),
                                                                      pad(a.attention_mask, 0)]))
    assert got.input_ids.dtype == got.attention_mask.dtype == np.int64
    for t, c in zip(made, copies):
        np.testing.assert_array_equal(t.input_ids, c)
    assert _stack(a, None, pad_id=1) is a


def test_length_multiple_pads_rows_up_to_it_but_not_past_the_model_length(tiny_artifacts):
    """``TextTokenizer(length_multiple=8)`` (a CLAP entry's "length_multiple"): the longest row rounded up to a
    multiple of 8 with <pad> and mask 0; a row near ``model_max_length`` is not padded past it."""
    clap, _ = _ours(tiny_artifacts)
    padded = TextTokenizer(tiny_artifacts / "tokenizer_clap.json", 77, 1, "CLAP", length_multiple=8)
    for texts in (["a dog"], ["a dog barking at the mailman", "rain"]):
        plain, got = clap.encode(texts), padded.encode(texts)
        assert got.length == -(-plain.length // 8) * 8 > 0
        np.testing.assert_array_equal(got.input_ids[:, : plain.length], plain.input_ids)
        np.testing.assert_array_equal(got.attention_mask[:, : plain.length], plain.attention_mask)
        assert (got.input_ids[:, plain.length:] == 1).all() and not got.attention_mask[:, plain.length:].any()
    long = " ".join(["word"] * 200)
    assert padded.encode([long], warn=False).length == clap.encode([long], warn=False).length == 77
    with pytest.raises(ValueError, match="length_multiple must be ≥ 1, got 0"):
        TextTokenizer(tiny_artifacts / "tokenizer_clap.json", 77, 1, "CLAP", length_multiple=0)


def test_runtime_pads_clap_tokens_as_its_manifest_entry_says_and_gets_the_same_embeddings(tiny_artifacts, tmp_path,
                                                                                           runtime):
    """A folder whose clap_text entry has "length_multiple": 8 (as ``CLAP_TEXT_MEA`` exports write it): the runtime
    pads CLAP's token rows to 16 for a 9- or 10-token prompt, and CLAP's embeddings and the conditioning stay those of
    the unpadded rows (padding is masked)."""
    import json
    import os

    from audioldm2_trt.export.onnx_export import content_hash
    from audioldm2_trt.runtime import AudioLDM2Runtime

    folder = tmp_path / "art"
    folder.mkdir()
    for f in tiny_artifacts.iterdir():
        if f.is_file() and f.name != "manifest.json":
            os.link(f, folder / f.name)
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    manifest["components"]["clap_text"]["length_multiple"] = 8
    manifest["content_hash"] = content_hash(manifest["components"], manifest["tokenizers"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    padded = AudioLDM2Runtime.load(folder, device="cpu")
    try:
        assert padded._clap_tok.length_multiple == 8 and runtime._clap_tok.length_multiple == 1
        kw = dict(prompt="a dog barking at the mailman", negative_prompt="noise", num_inference_steps=2, seed=1,
                  audio_length_in_s=2.0)
        assert padded._clap_tok.encode([kw["prompt"]]).length == 16 != runtime._clap_tok.encode([kw["prompt"]]).length
        a, b = padded.prepare(**kw).cond, runtime.prepare(**kw).cond
        np.testing.assert_allclose(a.clap_text, b.clap_text, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.generated, b.generated, rtol=1e-4, atol=1e-5)
    finally:
        padded.close()
