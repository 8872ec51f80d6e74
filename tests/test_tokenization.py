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
