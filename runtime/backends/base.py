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
