"""A convolution's bias as an ``Add`` node after it, for a session that keeps the two apart.

ONNX Runtime's CUDA ``Conv`` adds its bias with a cuDNN tensor op of its own after the convolution. On the HiFi-GAN
vocoder those adds are 96 of its 416 kernels, ~12 µs each on the H200 (run CO's profile: 1.17 ms of 7.14), where
ONNX Runtime's own broadcast ``Add`` over a tensor of that size reads and writes at bandwidth (~8 µs: the vocoder's
residual ``Add`` s of the same tensors take 7.6 µs). ``conv_bias_as_add`` rewrites each ``Conv(x, W, b)`` as
``Add(Conv(x, W), b')``, b' the bias shaped [M, 1, …] to broadcast over the spatial axes: the same sums.

ONNX Runtime folds such an ``Add`` back into the convolution at session creation (its ``ConvAddFusion`` rewrite),
unless the session disables that rewrite: the export records ``DISABLED_OPTIMIZERS`` in the component's manifest
entry and the runtime's session factory passes them (``optimization.disable_specified_optimizers``).
"""

from __future__ import annotations

DISABLED_OPTIMIZERS = ("ConvAddFusion",)


def conv_bias_as_add(model) -> int:
    """Rewrite every ``Conv`` of ``model`` (an ``onnx.ModelProto``, in place) whose bias is a 1-D initializer as the
    convolution without it and an ``Add`` of that bias, reshaped to [M, 1, …] (one 1 per spatial axis of the weight);
    the Add writes the Conv's old output, so readers are unchanged. Returns how many."""
    from onnx import helper, numpy_helper

    from .graph_index import drop_unread_initializers

    inits = {i.name: i for i in model.graph.initializer}
    nodes, added, replaced, moved = [], [], set(), 0
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type != "Conv" or len(node.input) < 3 or node.input[2] not in inits or node.input[1] not in inits:
            continue
        bias = numpy_helper.to_array(inits[node.input[2]])
        spatial = len(inits[node.input[1]].dims) - 2
        if bias.ndim != 1 or spatial < 1:
            continue
        out, name = node.output[0], node.input[2]
        shaped = f"{name}_over_{spatial}d"
        if shaped not in inits:
            inits[shaped] = numpy_helper.from_array(bias.reshape(bias.shape + (1,) * spatial), shaped)
            added.append(inits[shaped])
        replaced.add(name)
        del node.input[2:]
        node.output[0] = f"{out}_without_bias"
        nodes.append(helper.make_node("Add", [node.output[0], shaped], [out], name=f"{node.name or out}_bias"))
        moved += 1
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(added)
        drop_unread_initializers(model, names=replaced)  # the 1-D biases, read by nothing now
    return moved
