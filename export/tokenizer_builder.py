"""Small tokenizers built in code for random-weight pipelines.

No machine here can download a checkpoint's tokenizer, so random pipelines get tokenizers trained
with the `tokenizers` library on a fixed corpus. They have the same *kind* as the real ones:

- CLAP (RoBERTa): byte-level BPE, ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<s> A </s>`` framing.
- Flan-T5: Unigram over Metaspace pieces, ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, ``A </s>`` framing.

They are wrapped in transformers' fast tokenizer classes so that diffusers' pipeline accepts them,
and the export writes their ``tokenizer.json`` exactly as it would a real checkpoint's.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# A fixed corpus: sound-description words, so that prompts in tests tokenize into several pieces.
_CORPUS = [
    "a hammer hitting a wooden surface",
    "techno music with a strong upbeat tempo and high melodic riffs",
    "the sound of a dog barking in the distance while rain falls on a tin roof",
    "a man speaking over loud crowd noise, then applause",
    "birds chirping in a forest at dawn with a gentle stream",
    "low quality, noisy, distorted audio",
    "an orchestra playing a slow sad melody with violins and a piano",
    "footsteps on gravel, a car door closing and an engine starting",
    "thunder rumbling, heavy wind, water splashing",
    "electronic beat with deep bass and synthesizer pads",
]


def build_clap_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE with RoBERTa's special tokens and post-processing."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 600),
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return tok


def build_t5_tokenizer(vocab_size: int) -> Tokenizer:
    """Unigram over Metaspace pieces with T5's special tokens and ``A </s>`` post-processing."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=min(vocab_size, 300),
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # The Unigram trainer orders pieces of equal score differently from run to run; sort them so the
    # same config always gives the same ids (an export and a later rebuild must agree).
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    vocab = [(piece, round(score, 6)) for piece, score in vocab]  # scores differ in the last bits too
    specials, pieces = vocab[:3], sorted(vocab[3:], key=lambda e: (-e[1], e[0]))
    tok.model = models.Unigram([tuple(e) for e in specials + pieces], unk_id=2, byte_fallback=False)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok


def wrap_for_transformers(clap_tok: Tokenizer, t5_tok: Tokenizer, clap_max: int, t5_max: int):
    """Wrap the two tokenizers in transformers' fast classes (what diffusers' pipeline expects)."""
    from transformers import RobertaTokenizerFast, T5TokenizerFast

    tokenizer = RobertaTokenizerFast(
        tokenizer_object=clap_tok,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=clap_max,
    )
    tokenizer_2 = T5TokenizerFast(
        tokenizer_object=t5_tok,
        eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_ids=0, model_max_length=t5_max,
    )
    return tokenizer, tokenizer_2
