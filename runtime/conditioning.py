"""The text stage: CLAP + Flan-T5 → projection → GPT-2's 8 generated states, prompt and negative in one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import NonFiniteError
from .shapes import lm_buffer
from .tokenization import PromptTokens, Tokens


@dataclass(frozen=True)
class Conditioning:
    """UNet conditioning rows in diffusers' order: [negatives…, positives…] under CFG, else positives.

    generated   float32 [R, N, D_lm]   GPT-2 states (encoder_hidden_states)
    t5          float32 [R, S, D_t5]   Flan-T5 states (encoder_hidden_states_1)
    t5_mask     int64   [R, S]         their mask (encoder_attention_mask_1)
    clap_text   float32 [P, D_clap]    the positive prompts' CLAP embeddings (for ranking)
    """

    generated: np.ndarray
    t5: np.ndarray
    t5_mask: np.ndarray
    clap_text: np.ndarray

    def padded_t5(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(t5 [R, length, D], t5_mask [R, length]) with zero rows / mask 0 appended; this conditioning's own arrays
        where they have that length already (read only, as every use of them is)."""
        rows, have, dim = self.t5.shape
        if length < have:
            raise ValueError(f"cannot pad T5 states of length {have} to {length}")
        if length == have:
            return self.t5, self.t5_mask
        t5 = np.zeros((rows, length, dim), self.t5.dtype)
        t5[:, :have] = self.t5
        mask = np.zeros((rows, length), self.t5_mask.dtype)
        mask[:, :have] = self.t5_mask
        return t5, mask

    def repeat_rows(self, n: int) -> "Conditioning":
        """Each row n times in a row (prompt-major), as diffusers' ``repeat(1, n, 1).view`` does (itself for n = 1)."""
        if n == 1:
            return self
        rep = lambda a: np.repeat(a, n, axis=0)  # noqa: E731
        return Conditioning(rep(self.generated), rep(self.t5), rep(self.t5_mask), self.clap_text)


def _stack(a: Tokens, b: Tokens | None, pad_id: int) -> Tokens:
    """[b; a] (the negatives first), each padded at its end to the wider one's length: ids with ``pad_id``, mask 0."""
    if b is None:
        return a
    width = max(a.length, b.length)
    ids = np.full((len(b.input_ids) + len(a.input_ids), width), pad_id, a.input_ids.dtype)
    mask = np.zeros(ids.shape, a.attention_mask.dtype)
    for start, t in ((0, b), (len(b.input_ids), a)):
        ids[start: start + len(t.input_ids), : t.length] = t.input_ids
        mask[start: start + len(t.input_ids), : t.length] = t.attention_mask
    return Tokens(ids, mask)


def _started(session, feeds: dict):
    """``session.run(feeds)`` begun where the session can run in the background (``OrtSession.start``), else run
    now; returns a callable that gives its outputs."""
    start = getattr(session, "start", None)
    if start is not None:
        return start(feeds)
    outputs = session.run(feeds)
    return lambda: outputs


def check_finite(stage: str, array: np.ndarray) -> np.ndarray:
    if not np.isfinite(array).all():
        raise NonFiniteError(f"{stage} produced non-finite values (NaN or Inf) in an array of shape {array.shape}")
    return array


def generate_lm_states(gpt2, inputs_embeds: np.ndarray, attention_mask: np.ndarray, new_tokens: int,
                       stepwise: bool, max_positions: int) -> np.ndarray:
    """GPT-2's generated hidden states float32 [R, N, D] (N = ``new_tokens``) from the projection's
    inputs_embeds float32 [R, L, D] and attention_mask int64 [R, L], as diffusers' ``generate_language_model``:
    each step appends the last hidden state to the sequence, with mask 1.

    ``stepwise`` (the "step" graph): one pass per step over a buffer [R, lm_buffer(L, N), D] holding the sequence
    so far at its start and mask 0 on the unused tail (``max_positions``: GPT-2's position table); the graph
    returns the hidden state at index ``last``.
    Otherwise the "unrolled" graph does all N steps in one call."""
    if not stepwise:
        return gpt2.run({"inputs_embeds": inputs_embeds, "attention_mask": attention_mask})["generated"]
    rows, length, dim = inputs_embeds.shape
    width = lm_buffer(length, new_tokens, max_positions)
    x = np.zeros((rows, width, dim), np.float32)
    x[:, :length] = inputs_embeds
    mask = np.zeros((rows, width), np.int64)
    mask[:, :length] = attention_mask
    for k in range(new_tokens):
        out = gpt2.run({"inputs_embeds": x, "attention_mask": mask,
                        "last": np.array([length + k - 1], np.int64)})["last_hidden_state"]
        x[:, length + k] = out[:, 0]
        mask[:, length + k] = 1
    return x[:, length:length + new_tokens].copy()


class Deferred:
    """A computation run once, when first called or asked for its result: the host work a request can do while the
    device runs its text stage (``encode_text``'s ``meanwhile``). Calling it never raises; ``result()`` gives the
    value or raises what the computation raised."""

    def __init__(self, compute: Callable[[], object]):
        self._compute = compute
        self._outcome: tuple | None = None

    def __call__(self) -> None:
        if self._outcome is None:
            try:
                self._outcome = (True, self._compute())
            except Exception as err:  # kept for result(): raising inside GPT-2's call would blame GPT-2
                self._outcome = (False, err)

    def result(self):
        self()
        ok, value = self._outcome
        if not ok:
            raise value
        return value


def encode_text(sessions, tokens: PromptTokens, clap_pad_id: int, constants: dict, stepwise: bool,
                lm_loop=None, meanwhile: Deferred | None = None) -> Conditioning:
    """Run the four text components once over [negative; positive] rows (``constants``: the manifest's, for
    max_new_tokens and lm_max_positions). GPT-2's passes: ``lm_loop`` (``lm_loop.LmLoop``, the step graph's passes
    on the device) where given and it has buffers for these shapes, else ``generate_lm_states``. ``meanwhile``:
    called once — while the device runs GPT-2's queued passes where ``lm_loop`` queues them, else after them."""
    clap = _stack(tokens.clap, tokens.clap_negative, clap_pad_id)
    t5 = _stack(tokens.t5, tokens.t5_negative, 0)  # same width already: negatives take the positive length
    # CLAP and T5 do not depend on each other: CLAP runs on its session's worker while T5 runs (overlapping on the GPU)
    clap_run = _started(sessions["clap_text"], {"input_ids": clap.input_ids, "attention_mask": clap.attention_mask})
    t5_states = sessions["t5_encoder"].run({"input_ids": t5.input_ids, "attention_mask": t5.attention_mask})["last_hidden_state"]
    clap_embeds = clap_run()["text_embeds"]
    check_finite("t5_encoder", t5_states)
    proj = sessions["projection"].run({
        "text_embeds": check_finite("clap_text", clap_embeds), "t5_hidden_states": t5_states,
        "t5_attention_mask": t5.attention_mask,
    })
    generated = None
    if lm_loop is not None and stepwise:
        generated = lm_loop.generate(proj["inputs_embeds"], proj["attention_mask"], constants["max_new_tokens"],
                                     meanwhile)
    if generated is None:
        generated = generate_lm_states(sessions["gpt2"], proj["inputs_embeds"], proj["attention_mask"],
                                       constants["max_new_tokens"], stepwise, constants["lm_max_positions"])
    if meanwhile is not None:
        meanwhile()  # (done already where the passes were queued: a Deferred runs once)
    n_pos = tokens.clap.input_ids.shape[0]
    return Conditioning(check_finite("gpt2", generated), t5_states, t5.attention_mask, clap_embeds[-n_pos:])
