"""The backend interface the pipeline talks to. Nothing above it asks which backend it has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import InvalidRequestError


class Session(Protocol):
    """One loaded component. ``run`` is thread-safe and returns every output by name."""

    name: str

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def shared_stream(first, second):
    """The CUDA stream two sessions both run on (``OrtSession.stream``: the factory's ``loop_stream``), or None where
    they do not share one: only then can one's run be queued behind the other's without waiting for it."""
    stream = getattr(first, "stream", None)
    return stream if stream is not None and getattr(second, "stream", None) is stream else None


def settle(stream) -> None:
    """After an error in a loop that queues work on ``stream`` (None: nothing queued): let whatever is queued run out
    before its buffers are used again. A second error here is dropped: the one being raised says more."""
    if stream is not None:
        try:
            stream.synchronize()
        except Exception:
            pass


def queued_together(first, second) -> bool:
    """Whether two sessions' runs are queued one behind the other: they share a stream and both capture CUDA graphs
    (a replay is queued only when captured)."""
    return (shared_stream(first, second) is not None and bool(getattr(first, "cuda_graphs", False))
            and bool(getattr(second, "cuda_graphs", False)))


@dataclass(frozen=True)
class Device:
    """An explicit device: ``kind`` is "cpu" or "cuda"; ``index`` the GPU ordinal for CUDA."""

    kind: str
    index: int = 0

    @classmethod
    def parse(cls, text: "str | Device") -> "Device":
        """"cpu", "cuda" or "cuda:N" → a Device; a Device is returned as it is."""
        if isinstance(text, Device):
            return text
        if not isinstance(text, str):
            raise InvalidRequestError(f"device must be a string like 'cpu', 'cuda' or 'cuda:1', got {text!r}")
        kind, _, index = text.strip().lower().partition(":")
        if kind == "cpu" and not index:
            return cls("cpu")
        if kind == "cuda":
            if not index:
                return cls("cuda", 0)
            if index.isdigit():
                return cls("cuda", int(index))
        raise InvalidRequestError(f"device {text!r} is not one of 'cpu', 'cuda', 'cuda:N' (N = 0, 1, …)")

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"
