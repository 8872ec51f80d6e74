"""Weights in each artefact against the weights of ONNX Runtime's optimised graph of it (CPU only, no GPU needed).

    python scripts/cold_start.py --artifacts /tmp/art-fp16 --variants cache_write --repeat 1   # on the GPU: writes
    python scripts/initializer_bytes.py --artifacts /tmp/art-fp16 --optimized /tmp/ort-optimized-cache [--out DIR]

A session on CUDA held 7–108 MiB more than its artefact's weights after creation (docs/benchmarks.md, "What
limits it"). If ONNX Runtime's optimiser adds weights at load (a layout change that keeps the original beside a
transposed copy, a constant folded into a new initializer), its optimised graph holds them: this script sums the
initializer bytes of both, by dtype, and names the largest initializers that are new in the optimised graph.
Writes initializer_bytes.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx


def initializers(path: Path) -> dict[str, tuple[int, str]]:
    """name → (bytes, dtype name) of every initializer (external data read from beside the file)."""
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        out[t.name] = (int(np.prod(t.dims, dtype=np.int64)) * itemsize, onnx.TensorProto.DataType.Name(t.data_type))
    return out


def summary(inits: dict[str, tuple[int, str]]) -> dict:
    by_dtype: dict[str, float] = {}
    for size, dtype in inits.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + size / 2**20
    return {"mib": round(sum(s for s, _ in inits.values()) / 2**20, 1), "count": len(inits),
            "by_dtype_mib": {k: round(v, 1) for k, v in by_dtype.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--optimized", required=True, help="the folder cold_start.py's cache_write variant wrote")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rows = {}
    for optimized in sorted(Path(args.optimized).glob("*.onnx")):
        original = Path(args.artifacts, optimized.name)
        if not original.exists():
            continue
        before, after = initializers(original), initializers(optimized)
        new = sorted(((size, name, dtype) for name, (size, dtype) in after.items() if name not in before), reverse=True)
        rows[optimized.stem] = {
            "artefact": summary(before), "optimized": summary(after),
            "dropped_mib": round(sum(s for n, (s, _) in before.items() if n not in after) / 2**20, 1),
            "new_mib": round(sum(s for s, _, _ in new) / 2**20, 1),
            "largest_new": [{"name": n, "mib": round(s / 2**20, 2), "dtype": d} for s, n, d in new[:10]]}
        row = rows[optimized.stem]
        print(f"{optimized.stem:14s} artefact {row['artefact']['mib']:8.1f} MiB  optimised {row['optimized']['mib']:8.1f} "
              f"MiB  new {row['new_mib']:7.1f}  dropped {row['dropped_mib']:7.1f}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "initializer_bytes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
