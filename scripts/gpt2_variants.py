"""Measure the two GPT-2 graph designs on the CPU with ONNX Runtime: explicit KV cache vs full recompute.

    python scripts/gpt2_variants.py [--config audioldm2] [--batch 2] [--seq 40] [--runs 10]

Both graphs generate max_new_tokens hidden states in one call; the script checks that they agree and
prints the median latency of each. Used to choose the exported design (see docs/export.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from audioldm2_trt.export.sources import CONFIG_ROOT
from audioldm2_trt.export.wrappers import Gpt2GenerateKV, Gpt2GenerateRecompute


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="audioldm2")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=40)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    cfg = json.loads((CONFIG_ROOT / args.config / "language_model.json").read_text())
    n_new = cfg.pop("max_new_tokens")
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
    x = torch.randn(args.batch, args.seq, cfg["n_embd"])
    mask = torch.ones(args.batch, args.seq, dtype=torch.int64)
    mask[1:, -3:] = 0
    feeds = {"inputs_embeds": x.numpy(), "attention_mask": mask.numpy()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in (("kv_cache", Gpt2GenerateKV), ("recompute", Gpt2GenerateRecompute)):
            path = Path(tmp) / f"{name}.onnx"
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(cls(lm, n_new), (x, mask), str(path), input_names=list(feeds),
                                  output_names=["generated"], opset_version=17, dynamo=False,
                                  dynamic_axes={"inputs_embeds": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            out = sess.run(None, feeds)[0]
            times = []
            for _ in range(args.runs + 2):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                times.append(time.perf_counter() - t0)
            results[name] = (statistics.median(times[2:]) * 1e3, out)
    a, b = results["kv_cache"][1], results["recompute"][1]
    agree = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(f"GPT-2 ({args.config}), batch {args.batch}, prompt {args.seq} tokens, {n_new} new, ORT CPU "
          f"{ort.__version__}, {torch.get_num_threads()} threads")
    for name, (ms, _) in results.items():
        print(f"  {name:<10} median {ms:8.1f} ms")
    print(f"  rel-L2 between them: {agree:.2e}")


if __name__ == "__main__":
    main()
