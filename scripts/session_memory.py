"""Where a session's GPU memory goes at creation: its weights, its arena, and what lies outside both.

    python scripts/session_memory.py --artifacts /tmp/art-fp16 [--components unet,gpt2] [--unpacked] [--probe K] [--out DIR]

A CUDA session of the runtime held 7–128 MiB more than its artefact's weights after creation, and neither ONNX
Runtime's optimiser (initializer_bytes.py) nor the arenas explained it. This script found the cause (run Q,
docs/benchmarks.md): CUDA rounds each allocation over 1 MiB up to whole 2 MiB pages, and ONNX Runtime allocates each
weight on its own unless the session packs them (``packed_weights``; ``--unpacked`` measures without).
Here each component gets a fresh process (``--child``) that creates, with the runtime's own factory and options:

1. a primer: a one-node graph, so the CUDA context, the libraries and one session's CUDA state exist before;
2. the component's session; 3. the same session a second time.

After each, NVML's used memory (MiB). ONNX Runtime's default logger is at INFO in the child, so the log holds
every arena extension and reservation ("Extending BFCArena for Cuda", "Reserving memory in BFCArena"); the parent
splits it at the child's phase markers and sums the bytes per phase and per allocator. What a phase grew beyond
its arena's bytes was allocated outside ONNX Runtime's arenas (CUDA/cuDNN/cuBLAS state, kernel modules, direct
allocations); the second creation tells what repeats per session from what a process pays once.
``--probe``: one more child that makes K ``cudaMalloc`` calls of each of several sizes (unpacked, ONNX Runtime
allocates each initializer on its own: an arena extension per initializer) and reports NVML's growth per call, so
the initializers' count and sizes (reported per component, by size bucket) tell what that way of allocating costs.
Writes session_memory.json and each child's log beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from gpu_memory import GpuMemory
from initializer_bytes import initializers

MARK = "@@session_memory phase "
_EXTENDING = re.compile(r"Extending BFCArena for (\S+?)\.")
_EXTENDED = re.compile(r"Extended allocation by (\d+) bytes")
_RESERVING = re.compile(r"Reserving memory in BFCArena for (\S+) size: (\d+)")
KEEP = re.compile(r"BFCArena|Extended allocation|@@session_memory|Error|error|Traceback|\[E:|\[W:")


def primer_model() -> bytes:
    """A one-node float32 graph (y = x + x) for the CUDA provider."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "primer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime 1.2x/1.3x reads (the onnx package may write a newer one)
    return model.SerializeToString()


def child(folder: str, name: str, primer_path: str, packed: bool) -> dict:
    import onnxruntime as ort

    from audioldm2_trt.runtime.artifacts import load_artifacts
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    ort.set_default_logger_severity(1)  # the arenas log at INFO through the default logger
    art = load_artifacts(folder)
    factory = OrtSessionFactory.for_artifacts(art, "cuda", packed_weights=None if packed else False)
    mem = GpuMemory()
    marks = {"start": mem.used_mib()}
    alive = []  # every session stays open until the end
    for label, session_name, path, graphs in (("primer", "primer", primer_path, False),
                                              ("first", name, art.component_file(name), None),
                                              ("second", name, art.component_file(name), None)):
        print(f"{MARK}{label}", file=sys.stderr, flush=True)
        alive.append(factory.create(session_name, path, graphs=graphs))
        marks[label] = mem.used_mib()
    print(f"{MARK}end", file=sys.stderr, flush=True)
    return {"marks_mib": marks}


PROBE_SIZES = (512, 4096, 65536, 524288, 1 << 20, 3 << 19, 2 << 20, 3 << 20)
BUCKETS = ((0, 4096), (4096, 65536), (65536, 1 << 20), (1 << 20, 2 << 20), (2 << 20, 1 << 40))


def probe(primer_path: str, count: int) -> dict:
    """NVML growth per cudaMalloc (bytes) for each size in PROBE_SIZES, ``count`` calls each, after a primer session."""
    import ctypes

    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    keep = OrtSessionFactory("cuda").create("primer", primer_path, graphs=False)  # context + ONNX Runtime's cudart
    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so"):
        try:
            cudart = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise RuntimeError("no libcudart to probe with")
    mem, rows = GpuMemory(), {}
    for size in PROBE_SIZES:
        before, pointers = mem.used_mib(), []
        for _ in range(count):
            ptr = ctypes.c_void_p()
            if cudart.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(size)) != 0:
                raise RuntimeError(f"cudaMalloc({size}) failed")
            pointers.append(ptr)
        grew = mem.used_mib() - before
        for ptr in pointers:
            cudart.cudaFree(ptr)
        rows[str(size)] = {"calls": count, "grew_mib": grew, "bytes_per_call": round(grew * 2**20 / count)}
    del keep
    return rows


def size_buckets(sizes: list[int]) -> dict[str, dict]:
    """Initializer count and MiB per size bucket (bytes: [low, high))."""
    out = {}
    for low, high in BUCKETS:
        inside = [s for s in sizes if low <= s < high]
        out[f"{low}-{high}"] = {"count": len(inside), "mib": round(sum(inside) / 2**20, 2)}
    return out


def arena_bytes(log: str) -> dict[str, dict[str, int]]:
    """phase → allocator name → bytes the arenas took from the device in that phase (extensions + reservations)."""
    out: dict[str, dict[str, int]] = {}
    phase, allocator = "before", "?"
    for line in log.splitlines():
        if line.startswith(MARK):
            phase = line[len(MARK):].strip()
            continue
        if m := _EXTENDING.search(line):
            allocator = m.group(1)
        elif m := _EXTENDED.search(line):
            out.setdefault(phase, {}).setdefault(allocator, 0)
            out[phase][allocator] += int(m.group(1))
        elif m := _RESERVING.search(line):
            out.setdefault(phase, {}).setdefault(m.group(1), 0)
            out[phase][m.group(1)] += int(m.group(2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--components", default=None, help="comma-separated (default: every component of the folder)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--primer", help=argparse.SUPPRESS)
    ap.add_argument("--unpacked", action="store_true", help="every weight in an allocation of its own (the "
                    "runtime's packed_weights=False) instead of the runtime's default")
    ap.add_argument("--probe", type=int, default=0, metavar="K", help="also probe cudaMalloc's cost, K calls a size")
    ap.add_argument("--probe-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe_child:
        print(json.dumps(probe(args.primer, args.probe)))
        return
    if args.child:
        print(json.dumps(child(args.artifacts, args.child, args.primer, not args.unpacked)))
        return
    from audioldm2_trt.runtime.artifacts import load_artifacts

    art = load_artifacts(args.artifacts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    primer = out / "primer.onnx"
    primer.write_bytes(primer_model())
    rows, probed = {}, None
    if args.probe:
        proc = subprocess.run([sys.executable, __file__, "--artifacts", args.artifacts, "--probe-child",
                               "--probe", str(args.probe), "--primer", str(primer)], stdout=subprocess.PIPE, text=True)
        probed = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
            "error": f"probe exited {proc.returncode}"}
        print("cudaMalloc probe:", json.dumps(probed), flush=True)
    for name in args.components.split(",") if args.components else art.components:
        log_path = out / f"session_memory_{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, __file__, "--artifacts", args.artifacts, "--child", name,
                                   "--primer", str(primer)] + (["--unpacked"] if args.unpacked else []),
                                  stdout=subprocess.PIPE, stderr=log, text=True)
        text = log_path.read_text(errors="replace")  # keep only the arenas' lines, the markers and errors
        log_path.write_text("\n".join(x for x in text.splitlines() if KEEP.search(x)) + "\n")
        if proc.returncode != 0:
            rows[name] = {"error": f"child exited {proc.returncode}; see {log_path.name}"}
            print(name, rows[name]["error"], flush=True)
            continue
        marks = json.loads(proc.stdout.strip().splitlines()[-1])["marks_mib"]
        arenas = arena_bytes(text)
        sizes = [size for size, _ in initializers(art.component_file(name)).values()]
        weights = sum(sizes) / 2**20
        reserves = len(_RESERVING.findall(text.split(f"{MARK}first")[-1].split(f"{MARK}second")[0]))
        row = {"weights_mib": round(weights, 1), "initializers": len(sizes), "by_size": size_buckets(sizes),
               "reservations_first": reserves,
               "marks_mib": marks, "arena_mib": {
            phase: {a: round(b / 2**20, 1) for a, b in by.items()} for phase, by in arenas.items()}}
        for phase, before in (("primer", "start"), ("first", "primer"), ("second", "first")):
            grew = marks[phase] - marks[before]
            in_arena = sum(b for a, b in arenas.get(phase, {}).items() if "Pinned" not in a and "Cpu" not in a)
            row[phase] = {"grew_mib": round(grew, 1), "device_arena_mib": round(in_arena / 2**20, 1),
                          "outside_arenas_mib": round(grew - in_arena / 2**20, 1)}
        row["first"]["beyond_weights_mib"] = round(row["first"]["grew_mib"] - weights, 1)
        rows[name] = row
        print(f"{name:14s} weights {weights:7.1f}  " + "  ".join(
            f"{p}: grew {row[p]['grew_mib']:7.1f} arena {row[p]['device_arena_mib']:7.1f} "
            f"outside {row[p]['outside_arenas_mib']:6.1f}" for p in ("primer", "first", "second")), flush=True)
    (out / "session_memory.json").write_text(json.dumps({
        "artifacts": args.artifacts, "packed": not args.unpacked, "cudamalloc_probe": probed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
