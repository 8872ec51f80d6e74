"""GPT-2's generation loop on the device: the step graph's passes and the append graph, nothing copied in between.

The host loop (``conditioning.generate_lm_states``) copies the whole sequence buffer in before each of the 8 passes
and the hidden state back after it, and waits for each. Here the buffer stays on the device: each pass is the GPT-2
step graph (``last_hidden_state`` at index ``last``) followed by the append graph (``runtime/graphs/lm_append.onnx``,
export/lm_append_graph.py), which writes that state at ``last + 1``, sets its mask and advances ``last``. The two
alternate between two (inputs_embeds, attention_mask, last) triples: pass k reads triple k mod 2 and its append
writes the other. Where GPT-2 and the append graph share a CUDA stream (the factory's ``loop_stream``) and their
graphs are captured, all the passes are queued at once and waited for once; elsewhere each run is waited for.

Buffers: one ``LmBuffers`` per (rows, width) of the step graph's input, kept as long as the runtime, so the four
bindings (GPT-2 and append, for each triple) keep their addresses and run as CUDA graphs. They are used with the
GPT-2 session held (``OrtSession.held``): another thread's request would overwrite them.

    inputs_embeds   float32 [R, W, D]   the projection's sequence at the start, zeros after
    attention_mask  int64   [R, W]      its mask at the start, 0 after
    → generated     float32 [R, N, D]   the N appended states (diffusers' ``generate_language_model``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .backends.base import queued_together, settle, shared_stream
from .errors import BackendError
from .shapes import lm_buffer


@dataclass
class LmBuffers:
    """The device buffers of one (rows, width): two triples and GPT-2's hidden state, with their four bindings.

    embeds, masks, lasts   float32 [R, W, D], int64 [R, W], int64 [1]; two of each (triple a = 0, 1)
    hidden                 float32 [R, 1, D]   GPT-2's output, the append graph's input
    passes                 GPT-2's bindings: triple a → hidden
    appends                the append graph's bindings: triple a, hidden → triple 1 - a
    event                  an event of the shared stream, recorded behind the last pass (None without one)
    """

    embeds: list
    masks: list
    lasts: list
    hidden: object
    passes: list
    appends: list
    event: object

    @classmethod
    def allocate(cls, gpt2, append, rows: int, width: int, dim: int, stream=None) -> "LmBuffers":
        """(inside GPT-2's ``call``) Zeroed buffers and their bindings; ``stream``: the one GPT-2 and the append
        graph share, if they do."""
        zeros = lambda *dims, dtype=np.float32: gpt2.value(np.zeros(dims, dtype))  # noqa: E731
        embeds = [zeros(rows, width, dim), zeros(rows, width, dim)]
        masks = [zeros(rows, width, dtype=np.int64), zeros(rows, width, dtype=np.int64)]
        lasts = [zeros(1, dtype=np.int64), zeros(1, dtype=np.int64)]
        hidden = zeros(rows, 1, dim)
        passes = [gpt2.graph_binding({"inputs_embeds": embeds[a], "attention_mask": masks[a], "last": lasts[a]},
                                     {"last_hidden_state": hidden}) for a in (0, 1)]
        appends = [append.graph_binding({"inputs_embeds": embeds[a], "attention_mask": masks[a], "last": lasts[a],
                                         "hidden": hidden},
                                        {"inputs_embeds_next": embeds[1 - a], "attention_mask_next": masks[1 - a],
                                         "last_next": lasts[1 - a]}) for a in (0, 1)]
        return cls(embeds, masks, lasts, hidden, passes, appends, stream.event() if stream is not None else None)


class LmLoop:
    """GPT-2's ``new_tokens`` passes over device buffers (see the module's docstring).

    gpt2: the step graph's session (I/O bound: CUDA, or the CPU with ``bind=True``); append: the append graph's session
    on the same device; max_positions: GPT-2's position table (the buffer's widest); max_shapes: (rows, width) pairs
    given buffers of their own (GPT-2's ``max_graphs`` / 2: two graphs each) — past them ``generate`` returns None
    and the caller runs the host loop."""

    def __init__(self, gpt2, append, max_positions: int, max_shapes: int):
        self._gpt2, self._append = gpt2, append
        self._max_positions = max_positions
        self._max_shapes = max_shapes
        self._buffers: dict[tuple, LmBuffers] = {}
        self._stream = shared_stream(gpt2, append)

    @property
    def queued(self) -> bool:
        """Whether the passes are queued on one stream (GPT-2 and the append graph share one, both capture)."""
        return queued_together(self._gpt2, self._append)

    def generate(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, new_tokens: int,
                 meanwhile: Callable[[], None] | None = None) -> np.ndarray | None:
        """float32 [R, N, D] generated states for inputs_embeds float32 [R, L, D] and attention_mask int64 [R, L];
        None where this (rows, width) has no buffers (past ``max_shapes``), without calling ``meanwhile``.

        meanwhile: host work called once while the device runs the passes, where they are queued (after the last is
        queued, before waiting for them; elsewhere after they ran). It must not raise, nor take this runtime's
        sessions: GPT-2 is held around it."""
        rows, length, dim = inputs_embeds.shape
        width = lm_buffer(length, new_tokens, self._max_positions)
        x = np.zeros((rows, width, dim), np.float32)
        x[:, :length] = inputs_embeds
        mask = np.zeros((rows, width), np.int64)
        mask[:, :length] = attention_mask
        last = np.array([length - 1], np.int64)
        gpt2 = self._gpt2
        with gpt2.held():
            buffers = self._buffers.get((rows, width, dim))
            if buffers is None:
                if len(self._buffers) >= self._max_shapes:
                    return None
                buffers = self._buffers[(rows, width, dim)] = gpt2.call(
                    lambda: LmBuffers.allocate(gpt2, self._append, rows, width, dim, self._stream),
                    what=f"creating GPT-2's loop buffers of {rows} rows × {width} positions")
            capturing = self._may_capture(buffers)
            final = gpt2.call(lambda: self._passes(buffers, x, mask, last, new_tokens, capturing, meanwhile),
                              may_capture=capturing, what=f"GPT-2's {new_tokens} passes on the device")
        return final[:, length:length + new_tokens]

    def _may_capture(self, buffers: LmBuffers) -> bool:
        return any(self._gpt2.may_capture(b) for b in buffers.passes) or any(
            self._append.may_capture(b) for b in buffers.appends)

    def _passes(self, buffers: LmBuffers, x, mask, last, new_tokens: int, capturing: bool, meanwhile) -> np.ndarray:
        """(inside GPT-2's ``call``) The state copied into triple 0, the passes queued (each waited for where
        ``capturing`` or without a shared stream), ``meanwhile`` called, then the final sequence buffer [R, W, D]
        copied back."""
        buffers.embeds[0].update_inplace(x)
        buffers.masks[0].update_inplace(mask)
        buffers.lasts[0].update_inplace(last)
        wait = capturing or self._stream is None
        try:
            for k in range(new_tokens):
                a = k % 2
                self._gpt2.replay(buffers.passes[a], {}, wait=wait)
                self._append.replay(buffers.appends[a], {}, wait=wait)
            if self._stream is not None:
                self._stream.record(buffers.event)
            if meanwhile is not None:
                meanwhile()
            if self._stream is not None:
                self._stream.wait(buffers.event)
            return np.array(buffers.embeds[new_tokens % 2].numpy(), copy=True)
        except BaseException as err:
            settle(self._stream)
            if isinstance(err, BackendError) or not isinstance(err, Exception):
                raise
            raise self._gpt2.failure(f"GPT-2's {new_tokens} passes on the device", err) from err

    def close(self) -> None:
        self._buffers.clear()

