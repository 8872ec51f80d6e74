"""The guided solver step as a tiny ONNX graph, so that the denoising loop can stay on the GPU.

One step of classifier-free guidance and the DPM-Solver++ / DDIM update (``runtime.schedulers.Plan``):

    eps      = uncond + guidance · (text − uncond)        (uncond = text = noise_pred without CFG)
    x0       = (x − σ_s · eps) / α_s
    x_next   = c_x · x + c_0 · x0 + c_1 · prev_x0

The step reads its coefficients and hands the UNet its next timestep from tables that hold the whole plan, indexed
by a step counter the graph advances itself: a loop of such steps needs nothing from the host between them, so the
host can queue step i + 1 before step i has finished (runtime/denoising.py).

Inputs   noise_pred         float32 [K·P, C, F, M]  the UNet's output, K = 2 under CFG ([uncond; text]) else 1
         x                  float32 [P, C, F, M]    latents
         prev_x0            float32 [P, C, F, M]    the previous step's x0 (zeros before the first)
         guidance           float32 [P, 1, 1, 1]
         step               int64   [1]             i, this step's index in the plan
         coefficient_table  float32 [S, 5]          row i: σ_s, α_s, c_x, c_0, c_1 of step i
                                                    (``Plan.coefficient_table``)
         timestep_table     int64   [S + 1]         entry i: step i's timestep (``Plan.timestep_table``)
Outputs  x_next             float32 [P, C, F, M]
         x0                 float32 [P, C, F, M]
         sample_next        float32 [K·P, C, F, M]  x_next K times over: the UNet's next ``sample``
         step_next          int64   [1]             i + 1
         timestep_next      int64   [1]             timestep_table[i + 1]: the UNet's next ``timestep``
         row_check          float32 [P]             Σ eps·0 per row: 0 where the row's guided noise is finite,
                                                    NaN if not

The runtime ships the graph (``runtime/graphs/solver_step.onnx``, written by ``python -m
audioldm2_trt.export.solver_graph``); it holds no weights and does not depend on the model.
"""

from __future__ import annotations

from .shipped_graph import GRAPHS, checked_model, constant, write

GRAPH_FILE = GRAPHS / "solver_step.onnx"


def build_solver_step():
    import numpy as np
    from onnx import TensorProto, helper

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        constant("minus_one", np.array([-1], np.int64)), constant("zero", np.array(0, np.int64)),
        constant("zero_1d", np.array([0], np.int64)), constant("one_1d", np.array([1], np.int64)),
        constant("last", np.array(-1, np.int64)), constant("ones3", np.array([1, 1, 1], np.int64)),
        constant("spatial_axes", np.array([1, 2, 3], np.int64)), constant("nothing", np.array(0.0, np.float32)),
        # noise_pred [K·P, …] → [K, P, …]; uncond = [0], text = [K-1]
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Concat", ["minus_one", "x_shape"], ["k_shape"], axis=0),
        helper.make_node("Reshape", ["noise_pred", "k_shape"], ["halves"]),
        helper.make_node("Gather", ["halves", "zero"], ["uncond"], axis=0),
        helper.make_node("Gather", ["halves", "last"], ["text"], axis=0),
        helper.make_node("Sub", ["text", "uncond"], ["delta"]),
        helper.make_node("Mul", ["guidance", "delta"], ["guided_delta"]),
        helper.make_node("Add", ["uncond", "guided_delta"], ["eps"]),
        # this step's coefficients (row ``step`` of the table), the next step's index and timestep
        helper.make_node("Gather", ["coefficient_table", "step"], ["step_row"], axis=0),  # [1, 5]
        helper.make_node("Reshape", ["step_row", "minus_one"], ["coefficients"]),  # [5]
        helper.make_node("Split", ["coefficients"], ["sigma_s", "alpha_s", "c_x", "c_0", "c_1"], axis=0),  # [1] each
        helper.make_node("Add", ["step", "one_1d"], ["step_next"]),
        helper.make_node("Gather", ["timestep_table", "step_next"], ["timestep_next"], axis=0),
        # x0 = (x - sigma_s * eps) / alpha_s
        helper.make_node("Mul", ["sigma_s", "eps"], ["sigma_eps"]),
        helper.make_node("Sub", ["x", "sigma_eps"], ["x_minus"]),
        helper.make_node("Div", ["x_minus", "alpha_s"], ["x0"]),
        # x_next = c_x * x + c_0 * x0 + c_1 * prev_x0
        helper.make_node("Mul", ["c_x", "x"], ["part_x"]),
        helper.make_node("Mul", ["c_0", "x0"], ["part_x0"]),
        helper.make_node("Mul", ["c_1", "prev_x0"], ["part_prev"]),
        helper.make_node("Add", ["part_x", "part_x0"], ["partial"]),
        helper.make_node("Add", ["partial", "part_prev"], ["x_next"]),
        # sample_next = x_next repeated K times along the batch
        helper.make_node("Shape", ["noise_pred"], ["noise_shape"]),
        helper.make_node("Slice", ["noise_shape", "zero_1d", "one_1d"], ["noise_rows"]),
        helper.make_node("Slice", ["x_shape", "zero_1d", "one_1d"], ["x_rows"]),
        helper.make_node("Div", ["noise_rows", "x_rows"], ["k"]),
        helper.make_node("Concat", ["k", "ones3"], ["repeats"], axis=0),
        helper.make_node("Tile", ["x_next", "repeats"], ["sample_next"]),
        # row_check = sum(eps * 0) per row: NaN exactly where eps has a NaN or an Inf
        helper.make_node("Mul", ["eps", "nothing"], ["eps_zeroed"]),
        helper.make_node("ReduceSum", ["eps_zeroed", "spatial_axes"], ["row_check"], keepdims=0),
    ]
    latent = ["P", "C", "F", "M"]
    graph = helper.make_graph(
        nodes, "solver_step",
        [helper.make_tensor_value_info("noise_pred", f32, ["KP", "C", "F", "M"]),
         helper.make_tensor_value_info("x", f32, latent),
         helper.make_tensor_value_info("prev_x0", f32, latent),
         helper.make_tensor_value_info("guidance", f32, ["P", 1, 1, 1]),
         helper.make_tensor_value_info("step", i64, [1]),
         helper.make_tensor_value_info("coefficient_table", f32, ["S", 5]),
         helper.make_tensor_value_info("timestep_table", i64, ["S1"])],
        [helper.make_tensor_value_info("x_next", f32, latent),
         helper.make_tensor_value_info("x0", f32, latent),
         helper.make_tensor_value_info("sample_next", f32, ["KP", "C", "F", "M"]),
         helper.make_tensor_value_info("step_next", i64, [1]),
         helper.make_tensor_value_info("timestep_next", i64, [1]),
         helper.make_tensor_value_info("row_check", f32, ["P"])])
    return checked_model(graph)


def main() -> None:
    write(build_solver_step(), GRAPH_FILE)


if __name__ == "__main__":
    main()
