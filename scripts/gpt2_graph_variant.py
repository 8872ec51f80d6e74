"""A copy of an artefact folder with the other GPT-2 graph, for side-by-side measurements.

    python scripts/gpt2_graph_variant.py --artifacts /tmp/art-fp16 --graph unrolled --out /tmp/art-fp16-unrolled

Every other component is hard-linked from ``--artifacts`` (the same files, byte for byte); GPT-2 is exported again
from the manifest's source with the graph asked for (``export --gpt2-graph``) and converted as the folder's
precision converts it, and the manifest's gpt2 entry replaced (and its content hash recomputed). A full export with
``--gpt2-graph`` gives the same folder; this takes a minute instead of the fused UNet's six.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--graph", required=True, choices=["step", "unrolled"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from audioldm2_trt.export.components import GPT2_GRAPHS, pipeline_constants
    from audioldm2_trt.export.onnx_export import content_hash, export_component
    from audioldm2_trt.export.sources import load_pipeline
    from audioldm2_trt.export.validate import source_of

    src, out = Path(args.artifacts), Path(args.out)
    manifest = json.loads((src / "manifest.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "manifest.json" and not f.name.startswith("gpt2.onnx"):
            os.link(f, out / f.name)
    pipe = load_pipeline(source_of(manifest))
    entry = export_component(pipe, pipeline_constants(pipe), "gpt2", out, manifest["precision"],
                             spec=GPT2_GRAPHS[args.graph])
    manifest["components"]["gpt2"] = {**entry, "graph": args.graph}
    manifest["content_hash"] = content_hash(manifest["components"], manifest["tokenizers"])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{out}: gpt2 graph {args.graph}, {entry['bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
