"""Tokenisation for the two text encoders, with diffusers' padding and truncation rules.

- CLAP (RoBERTa): each prompt truncated to ``model_max_length``, batch padded to its longest prompt
  (diffusers pads to 512; the export tests prove the embeddings are equal).
- T5: prompts padded to the longest prompt; negative prompts padded *and truncated* to that length.

The ``tokenizers.Tokenizer`` objects are never reconfigured after load (truncation is applied per
encoding, then the post-processor adds the special tokens), so one instance serves many threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

log = logging.getLogger("audioldm2_trt.runtime")


@dataclass(frozen=True)
class Tokens:
    """input_ids and attention_mask, int64 [B, S]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


class TextTokenizer:
    """One tokenizer with its maximum length and pad id. ``length_multiple``: rows padded to the longest row are
    padded further, to a multiple of it (not past ``model_max_length``), for an encoder whose fused attention needs
    that (the manifest entry's "length_multiple", export/components.py ``Fp16Recipe``)."""

    def __init__(self, path, model_max_length: int, pad_token_id: int, name: str, length_multiple: int = 1):
        if length_multiple < 1:
            raise ValueError(f"{name}: length_multiple must be ≥ 1, got {length_multiple}")
        self.name = name
        self.length_multiple = length_multiple
        self.tok = Tokenizer.from_file(str(path))
        self.tok.no_truncation()
        self.tok.no_padding()
        self.model_max_length = model_max_length
        self.pad_token_id = pad_token_id
        self.n_special = self.tok.num_special_tokens_to_add(is_pair=False)

    def encode(self, texts: list[str], max_length: int | None = None, pad_to: int | None = None,
               warn: bool = True) -> Tokens:
        """Truncate each text to ``max_length`` tokens (special tokens included), then pad to
        ``pad_to`` or to the longest row (rounded up to ``length_multiple``)."""
        max_length = max_length or self.model_max_length
        rows = []
        for text in texts:
            enc = self.tok.encode(text, add_special_tokens=False)
            if len(enc.ids) > max_length - self.n_special:
                if warn:
                    removed = self.tok.decode(enc.ids[max_length - self.n_special:])
                    log.warning("%s: prompt truncated to %d tokens; removed: %r", self.name, max_length, removed)
                enc.truncate(max_length - self.n_special)
            rows.append(self.tok.post_process(enc).ids)
        width = pad_to or self._padded_width(max(len(r) for r in rows))
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return Tokens(ids, mask)

    def _padded_width(self, longest: int) -> int:
        """The width of rows whose longest has ``longest`` tokens: rounded up to ``length_multiple``, unless that
        would pass ``model_max_length``."""
        rounded = -(-longest // self.length_multiple) * self.length_multiple
        return rounded if rounded <= self.model_max_length else longest


@dataclass(frozen=True)
class PromptTokens:
    """Tokens of the positive and negative prompts for both encoders."""

    clap: Tokens
    t5: Tokens
    clap_negative: Tokens | None
    t5_negative: Tokens | None


def tokenize_prompts(clap: TextTokenizer, t5: TextTokenizer, prompts: list[str],
                     negative: list[str] | None) -> PromptTokens:
    """As diffusers' ``encode_prompt``: the negative T5 tokens take the positive T5 length."""
    t5_pos = t5.encode(prompts)
    clap_pos = clap.encode(prompts)
    if negative is None:
        return PromptTokens(clap_pos, t5_pos, None, None)
    clap_neg = clap.encode(negative, warn=False)
    t5_neg = t5.encode(negative, max_length=t5_pos.length, pad_to=t5_pos.length, warn=False)
    return PromptTokens(clap_pos, t5_pos, clap_neg, t5_neg)
