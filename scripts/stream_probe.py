"""Does ONNX Runtime's CUDA provider (the installed version) let a caller queue graph replays without waiting?

Three questions, each on small ONNX graphs built here (no artefacts needed), CUDA graphs on, I/O bound on the device:
  1. replay_sync: host time of one ``run_with_iobinding`` of a captured graph, with the run option
     ``disable_synchronize_execution_providers`` off and on (and no ``synchronize_outputs``): does the replay wait
     for the GPU?
  2. shared_stream: two sessions given one ``user_compute_stream`` (made here through the CUDA driver API, non-blocking),
     one's output bound as the other's input and back, run alternately 40 times without waiting: the same values as
     the same chain run with waits, and how long each takes.
  3. lagged_read: the chain again, reading each round's small output one round late after an event recorded behind
     it (``cuEventSynchronize``), as a loop that checks every step without stalling the GPU would.

    python scripts/stream_probe.py --out DIR     # writes DIR/stream-probe.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    assert lib.cuInit(0) == 0
    return lib


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed: CUDA driver error {code}")


def make_stream(lib, device: int = 0) -> int:
    dev, ctx, stream = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
    _check(lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
    _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    _check(lib.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")  # CU_STREAM_NON_BLOCKING
    return stream.value


def make_event(lib) -> ctypes.c_void_p:
    ev = ctypes.c_void_p()
    _check(lib.cuEventCreate(ctypes.byref(ev), 2), "cuEventCreate")  # CU_EVENT_DISABLE_TIMING
    return ev


def matmul_chain(n: int, depth: int, path: Path) -> None:
    """y = tanh(x @ W) applied ``depth`` times, fp16 [n, n]; s = sum of y's first row (a small second output)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float16)
    nodes, prev = [], "x"
    for k in range(depth):
        nodes += [helper.make_node("MatMul", [prev, "w"], [f"m{k}"]), helper.make_node("Tanh", [f"m{k}"], [f"t{k}"])]
        prev = f"t{k}"
    nodes += [helper.make_node("Identity", [prev], ["y"]),
              helper.make_node("ReduceSum", [prev, "axes"], ["s"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [n, n]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT16, [n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1], np.int64), "axes")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def scale_graph(n: int, path: Path) -> None:
    """x_next = y * 0.9 + 0.05, fp16 [n, n]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["y", "a"], ["m"]), helper.make_node("Add", ["m", "b"], ["x_next"])], "scale",
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [n, n])],
        [helper.make_tensor_value_info("x_next", TensorProto.FLOAT16, [n, n])],
        [numpy_helper.from_array(np.array(0.9, np.float16), "a"), numpy_helper.from_array(np.array(0.05, np.float16), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--rounds", type=int, default=40)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    lib = _driver()
    chain, scale = out / "chain.onnx", out / "scale.onnx"
    matmul_chain(a.n, a.depth, chain)
    scale_graph(a.n, scale)
    result = {"onnxruntime": ort.__version__, "n": a.n, "depth": a.depth, "rounds": a.rounds}

    def session(path, stream=None):
        opts = {"device_id": 0, "enable_cuda_graph": 1, "use_tf32": 0}
        if stream is not None:
            opts["user_compute_stream"] = str(stream)
        so = ort.SessionOptions()
        return ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", opts)])

    def run_opts(graph_id: int, no_sync: bool):
        ro = ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", str(graph_id))
        if no_sync:
            ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return ro

    def value(arr):
        return ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)

    def empty(shape):
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float16, "cuda", 0)

    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((a.n, a.n)).astype(np.float16)

    # 1. one session on its own stream: does a replay wait?
    s = session(chain)
    x, y, sm = value(x0), empty((a.n, a.n)), empty((a.n,))
    b = s.io_binding()
    b.bind_ortvalue_input("x", x)
    b.bind_ortvalue_output("y", y)
    b.bind_ortvalue_output("s", sm)
    for _ in range(4):  # regular runs, then the capture
        s.run_with_iobinding(b, run_opts(1, False))
        b.synchronize_outputs()
    timings = {}
    for no_sync in (False, True, False, True):
        host = []
        t_all = time.perf_counter()
        for _ in range(a.rounds):
            t = time.perf_counter()
            s.run_with_iobinding(b, run_opts(1, no_sync))
            host.append((time.perf_counter() - t) * 1e3)
        _check(lib.cuCtxSynchronize(), "cuCtxSynchronize")
        wall = (time.perf_counter() - t_all) * 1e3
        timings.setdefault("no_sync" if no_sync else "sync", []).append(
            {"host_ms_median": statistics.median(host), "wall_ms_per_run": wall / a.rounds})
    result["replay_sync"] = timings
    print("replay_sync", json.dumps(timings))
    del b, s

    # 2. two sessions on one user stream, chained through bound buffers
    stream = make_stream(lib)
    sa, sb = session(chain, stream), session(scale, stream)
    xs, ys, ss = value(x0), empty((a.n, a.n)), [empty((a.n,)), empty((a.n,))]
    ba = [sa.io_binding(), sa.io_binding()]
    for k in (0, 1):
        ba[k].bind_ortvalue_input("x", xs)
        ba[k].bind_ortvalue_output("y", ys)
        ba[k].bind_ortvalue_output("s", ss[k])
    bb = sb.io_binding()
    bb.bind_ortvalue_input("y", ys)
    bb.bind_ortvalue_output("x_next", xs)

    def chain_rounds(no_sync: bool, lagged: bool = False):
        xs.update_inplace(x0)
        _check(lib.cuCtxSynchronize(), "cuCtxSynchronize")
        events = [make_event(lib), make_event(lib)]
        sums = []
        t = time.perf_counter()
        for r in range(a.rounds):
            k = r % 2
            sa.run_with_iobinding(ba[k], run_opts(2 + k, no_sync))
            sb.run_with_iobinding(bb, run_opts(2, no_sync))
            if not no_sync:
                ba[k].synchronize_outputs()
                sums.append(np.array(ss[k].numpy(), copy=True))
            elif lagged:
                _check(lib.cuEventRecord(events[k], ctypes.c_void_p(stream)), "cuEventRecord")
                if r > 0:
                    _check(lib.cuEventSynchronize(events[1 - k]), "cuEventSynchronize")
                    sums.append(np.array(ss[1 - k].numpy(), copy=True))
        _check(lib.cuStreamSynchronize(ctypes.c_void_p(stream)), "cuStreamSynchronize")
        if lagged:
            sums.append(np.array(ss[(a.rounds - 1) % 2].numpy(), copy=True))
        wall = (time.perf_counter() - t) * 1e3
        return np.array(xs.numpy(), copy=True), sums, wall / a.rounds

    for _ in range(3):  # warm: regular runs, then captures
        chain_rounds(False)
    ref, ref_sums, _ = chain_rounds(False)
    rows = {}
    for name, no_sync, lagged in (("sync", False, False), ("no_sync", True, False), ("lagged_read", True, True),
                                  ("sync_again", False, False), ("no_sync_again", True, False),
                                  ("lagged_read_again", True, True)):
        got, sums, per_round = chain_rounds(no_sync, lagged)
        row = {"ms_per_round": per_round, "x_equal_to_synced": bool(np.array_equal(got, ref)),
               "x_max_abs_diff": float(np.max(np.abs(got.astype(np.float32) - ref.astype(np.float32))))}
        if sums:
            row["sums_equal_to_synced"] = bool(len(sums) == len(ref_sums)
                                               and all(np.array_equal(u, v) for u, v in zip(sums, ref_sums)))
        rows[name] = row
        print(name, json.dumps(row))
    result["shared_stream"] = rows
    chain.unlink()
    scale.unlink()
    (out / "stream-probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
