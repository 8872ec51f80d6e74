"""Tokenisation equals what diffusers' pipeline feeds its encoders (transformers tokenizers)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

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
