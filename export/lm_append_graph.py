"""GPT-2's growing sequence as a tiny ONNX graph, so that its generation loop can stay on the GPU.

diffusers' ``generate_language_model`` appends each step's last hidden state to the sequence with mask 1. The step
GPT-2 graph (``export/wrappers.Gpt2Step``) reads the sequence from a fixed-width buffer and returns the hidden state
at index ``last``; this graph writes that state into the buffer at ``last + 1``, sets the mask there, and advances
``last``. A loop of GPT-2 pass + append then needs nothing from the host between passes (runtime/lm_loop.py).

Inputs   inputs_embeds       float32 [R, W, D]   the sequence so far at the start of the buffer
         attention_mask      int64   [R, W]      1 on its attended positions, 0 on the unused tail
         last                int64   [1]         the index GPT-2 read its hidden state at
         hidden              float32 [R, 1, D]   that hidden state (the step graph's ``last_hidden_state``)
Outputs  inputs_embeds_next  float32 [R, W, D]   inputs_embeds with ``hidden`` at index last + 1
         attention_mask_next int64   [R, W]      attention_mask with 1 at index last + 1
         last_next           int64   [1]         last + 1

Values are copied, not computed (``Where``): the buffer equals the one the host loop builds, bit for bit.
The runtime ships the graph (``runtime/graphs/lm_append.onnx``, written by ``python -m
audioldm2_trt.export.lm_append_graph``); it holds no weights and does not depend on the model.
"""

from __future__ import annotations

from .shipped_graph import GRAPHS, checked_model, constant, write

GRAPH_FILE = GRAPHS / "lm_append.onnx"


def build_lm_append():
    import numpy as np
    from onnx import TensorProto, helper

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        constant("zero", np.array(0, np.int64)), constant("one", np.array(1, np.int64)),
        constant("one_1d", np.array([1], np.int64)), constant("two_1d", np.array([2], np.int64)),
        constant("seq_axis", np.array(1, np.int64)), constant("last_axis", np.array([-1], np.int64)),
        # positions 1 … W along each row (CumSum of ones: no Range, whose bounds would be read on the host)
        helper.make_node("Mul", ["attention_mask", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "one"], ["ones"]),
        helper.make_node("CumSum", ["ones", "seq_axis"], ["positions"]),
        # index last + 1 is position last + 2
        helper.make_node("Add", ["last", "two_1d"], ["target"]),
        helper.make_node("Equal", ["positions", "target"], ["at"]),  # bool [R, W]
        helper.make_node("Unsqueeze", ["at", "last_axis"], ["at_3d"]),  # [R, W, 1]
        helper.make_node("Where", ["at_3d", "hidden", "inputs_embeds"], ["inputs_embeds_next"]),
        helper.make_node("Where", ["at", "one", "attention_mask"], ["attention_mask_next"]),
        helper.make_node("Add", ["last", "one_1d"], ["last_next"]),
    ]
    graph = helper.make_graph(
        nodes, "lm_append",
        [helper.make_tensor_value_info("inputs_embeds", f32, ["R", "W", "D"]),
         helper.make_tensor_value_info("attention_mask", i64, ["R", "W"]),
         helper.make_tensor_value_info("last", i64, [1]),
         helper.make_tensor_value_info("hidden", f32, ["R", 1, "D"])],
        [helper.make_tensor_value_info("inputs_embeds_next", f32, ["R", "W", "D"]),
         helper.make_tensor_value_info("attention_mask_next", i64, ["R", "W"]),
         helper.make_tensor_value_info("last_next", i64, [1])])
    return checked_model(graph)


def main() -> None:
    write(build_lm_append(), GRAPH_FILE)


if __name__ == "__main__":
    main()
