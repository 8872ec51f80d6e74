"""The UNet's self-attention Q/K/V layouts on ONNX Runtime's CUDA MultiHeadAttention, timed at the fused full-size
UNet's shapes. A measurement script (docs/benchmarks.md, "What limits it"), not a test.

    python scripts/self_attention_probe.py [--layers 16] [--rounds 7] [--replays 200] --out DIR

ONNX Runtime's attention fusion gives each of the UNet's 64 self-attentions its Q, K and V packed, one MatMul to
[B, S, N, 3, H] (``packed``); its flash-attention path then unpacks them with a kernel of its own (``AddBiasUnpack``)
at every run: 64 launches, 0.17 ms a step (run AN's profile). Read as they are, three [B, S, N·H] tensors need no
unpacking, but cost two more GEMM launches. Which is faster was not measured. Here each layout is one graph of
``--layers`` attention layers chained, fp16, at the UNet's batch 2 and 8 heads, for each of its three
self-attention sizes (1024 tokens of 256 channels, 256 of 384, 64 of 640), captured as a CUDA graph, run with
the UNet's attention-kernel choice (``sdpa_kernel``) and the runtime's CUDA provider options:

- ``packed``: one MatMul [C, 3C] → Reshape [B, S, N, 3, H] → MultiHeadAttention (what the export writes);
- ``three``: three MatMuls [C, C] → MultiHeadAttention(q, k, v);
- ``split``: one MatMul [C, 3C] → Split in three → MultiHeadAttention(q, k, v) (the unpacking as ONNX's Split).

The three graphs hold the same weights (rearranged), so their outputs must agree (checked, fp16's tolerance).
Graph replays are timed whole, each waited for, variants interleaved round by round; the per-layer time is the
replay's median over ``--layers``, so host time per replay, the same for every variant, is spread thin and cancels
in the differences. Writes self_attention_probe.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from result_json import write_result  # scripts/ is on the path of a script run from it

BATCH, HEADS = 2, 8
# (tokens, channels) of the full-size UNet's self-attentions and how many of the 64 run at each, per step
SIZES = ((1024, 256, 20), (256, 384, 20), (64, 640, 24))
VARIANTS = ("packed", "three", "split")


def build(variant: str, tokens: int, channels: int, layers: int, seed: int = 0):
    """An onnx.ModelProto: ``layers`` self-attentions chained, x [B, tokens, channels] fp16 → y, each layer's
    weights W_q, W_k, W_v [C, C] laid out as ``variant`` reads them."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    head = channels // HEADS
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        wq, wk, wv = (rng.standard_normal((channels, channels)).astype(np.float32) / np.sqrt(channels)
                      for _ in range(3))
        mha_inputs = []
        if variant == "packed":  # columns (head, q|k|v, channel): the packed [B, S, N, 3, H] layout
            w = np.stack([m.reshape(channels, HEADS, head) for m in (wq, wk, wv)], axis=2).reshape(channels, -1)
            inits += [numpy_helper.from_array(w.astype(np.float16), f"w{i}"),
                      numpy_helper.from_array(np.array([0, 0, HEADS, 3, head], np.int64), f"shape{i}")]
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"qkv{i}"]),
                      helper.make_node("Reshape", [f"qkv{i}", f"shape{i}"], [f"packed{i}"])]
            mha_inputs = [f"packed{i}"]
        elif variant == "three":
            for name, m in zip("qkv", (wq, wk, wv)):
                inits.append(numpy_helper.from_array(m.astype(np.float16), f"w{name}{i}"))
                nodes.append(helper.make_node("MatMul", [x, f"w{name}{i}"], [f"{name}{i}"]))
            mha_inputs = [f"q{i}", f"k{i}", f"v{i}"]
        elif variant == "split":  # columns (q|k|v, head, channel)
            inits.append(numpy_helper.from_array(np.concatenate([wq, wk, wv], axis=1).astype(np.float16), f"w{i}"))
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"qkv{i}"]),
                      helper.make_node("Split", [f"qkv{i}"], [f"q{i}", f"k{i}", f"v{i}"], axis=2, num_outputs=3)]
            mha_inputs = [f"q{i}", f"k{i}", f"v{i}"]
        else:
            raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
        out = "y" if i == layers - 1 else f"a{i}"
        nodes.append(helper.make_node("MultiHeadAttention", mha_inputs, [out], domain="com.microsoft",
                                      num_heads=HEADS))
        x = out
    shape = [BATCH, tokens, channels]
    graph = helper.make_graph(nodes, f"self_attention_{variant}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9  # what ONNX Runtime 1.31 reads (a newer onnx writes IR 14 by default)
    return model


class Replayer:
    """One captured session: x bound on the device, y written to a device buffer; ``replay()`` runs the graph and
    waits for it."""

    def __init__(self, model, x: np.ndarray, provider_options: dict):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=[
            ("CUDAExecutionProvider", {**provider_options, "enable_cuda_graph": "1"})])
        if self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"CUDA provider not taken: {self.session.get_providers()}")
        self.x = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        self.y = ort.OrtValue.ortvalue_from_shape_and_type(x.shape, np.float16, "cuda", 0)
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input("x", self.x)
        self.binding.bind_ortvalue_output("y", self.y)
        self.run_options = ort.RunOptions()
        for _ in range(2):  # the first run captures, the second replays
            self.replay()

    def replay(self) -> None:
        self.session.run_with_iobinding(self.binding, self.run_options)

    def output(self) -> np.ndarray:
        return self.y.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16, help="attention layers chained in each graph")
    ap.add_argument("--rounds", type=int, default=7, help="rounds, the variants interleaved in each")
    ap.add_argument("--replays", type=int, default=200, help="graph replays timed per variant and round")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import onnxruntime as ort

    from audioldm2_trt.runtime.backends.base import Device
    from audioldm2_trt.runtime.backends.ort_options import COMPONENT_PROVIDER_OPTIONS, cuda_provider_options
    from audioldm2_trt.runtime.backends.cuda_driver import device_name

    options = {**cuda_provider_options(Device.parse("cuda:0"), tf32=True), **COMPONENT_PROVIDER_OPTIONS["unet"]}
    result = {"device": device_name(0), "onnxruntime": ort.__version__, "provider_options": options,
              "batch": BATCH, "heads": HEADS, "layers": args.layers, "rounds": args.rounds, "replays": args.replays,
              "sizes": []}
    for tokens, channels, per_step in SIZES:
        x = (np.random.default_rng(1).standard_normal((BATCH, tokens, channels)) * 0.5).astype(np.float16)
        runners = {v: Replayer(build(v, tokens, channels, args.layers), x, options) for v in VARIANTS}
        reference = runners["packed"].output().astype(np.float32)
        agreement = {v: float(np.linalg.norm(r.output().astype(np.float32) - reference) / np.linalg.norm(reference))
                     for v, r in runners.items()}
        if not all(np.isfinite(list(agreement.values()))) or max(agreement.values()) > 2e-2:
            raise SystemExit(f"the layouts disagree at {tokens}x{channels}: {agreement}")
        times = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:
                start = time.perf_counter()
                for _ in range(args.replays):
                    runners[v].replay()
                times[v].append((time.perf_counter() - start) / args.replays / args.layers * 1e6)
        per_layer = {v: float(np.median(t)) for v, t in times.items()}
        row = {"tokens": tokens, "channels": channels, "per_step": per_step, "rel_l2_vs_packed": agreement,
               "us_per_layer": per_layer, "us_per_layer_all_rounds": times,
               "step_delta_us_vs_packed": {v: (per_layer[v] - per_layer["packed"]) * per_step for v in VARIANTS}}
        result["sizes"].append(row)
        print(f"{tokens:5d} tokens x {channels} ch: " + ", ".join(
            f"{v} {per_layer[v]:.2f} µs/layer" for v in VARIANTS) + f"  (rel-L2 vs packed {agreement})", flush=True)
        del runners
    result["step_delta_us_vs_packed"] = {v: sum(r["step_delta_us_vs_packed"][v] for r in result["sizes"])
                                         for v in VARIANTS}
    print("per UNet step (64 self-attentions), µs against packed:", result["step_delta_us_vs_packed"])
    write_result(args.out, "self_attention_probe.json", result)


if __name__ == "__main__":
    main()
