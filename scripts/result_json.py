"""The measurement scripts' last step: the result as JSON, written into the output folder and printed."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(out: str | Path, filename: str, result: dict) -> Path:
    """Write ``result`` (indented JSON) to ``out/filename``, making ``out`` if needed, print it, and return the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    path = out / filename
    path.write_text(text)
    print(text)
    return path
