"""Why a component's CUDA graph is refused: the host↔device copies ONNX Runtime inserts.

    python scripts/ort_placement.py ARTEFACT_DIR [--components a,b]

ONNX Runtime captures a CUDA graph only when no compute node runs on the CPU, i.e. when partitioning
inserted no MemcpyFromHost / MemcpyToHost node. This saves each component's partitioned graph (weights
to a side file) and prints every Memcpy node with the ops around it.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort


def memcpy_report(path: Path, out_dir: Path) -> list[str]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(out_dir / "optimized.onnx")
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=[("CUDAExecutionProvider", {"use_tf32": 0})])
    model = onnx.load(str(out_dir / "optimized.onnx"), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    lines = []
    for n in model.graph.node:
        if n.op_type.startswith("Memcpy"):
            src = producers.get(n.input[0])
            dst = [c.op_type + ":" + c.name for c in consumers[n.output[0]]]
            lines.append(f"{n.op_type} {n.input[0]!r} from {src.op_type + ':' + src.name if src else 'graph input'} to {dst}")
    ops = collections.Counter(n.op_type for n in model.graph.node)
    lines.append(f"{len(model.graph.node)} nodes; most common: {ops.most_common(12)}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--components", default="clap_text,t5_encoder,gpt2,vae_decoder,clap_audio,unet,vocoder")
    args = ap.parse_args()
    import json

    manifest = json.loads(Path(args.folder, "manifest.json").read_text())
    for name in args.components.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"== {name}")
            for line in memcpy_report(Path(args.folder, manifest["components"][name]["file"]), Path(tmp))[:40]:
                print("  ", line, flush=True)


if __name__ == "__main__":
    main()
