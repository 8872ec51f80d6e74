"""A convolution's bias as an ``Add`` node after it, for a session that keeps the two apart.

ONNX Runtime's CUDA ``Conv`` adds its bias with a cuDNN tensor op of its own after the convolution. On the HiFi-GAN
vocoder those adds are 96 of its 416 kernels, ~12 µs each on the H200 (run CO's profile: 1.17 ms of 7.14), where
ONNX Runtime's own broadcast ``Add`` over a tensor of that size reads and writes at bandwidth (~8 µs: the vocoder's
residual ``Add`` s of the same tensors take 7.6 µs). ``conv_bias_as_add`` rewrites each ``Conv(x, W, b)`` as
``Add(Conv(x, W), b')``, b' the bias shaped [M, 1, …] to broadcast over the spatial axes: the same sums
(``ConvTranspose`` likewise: ONNX Runtime adds its bias with the same cuDNN op). ONNX Runtime's ``NhwcConv``
(com.microsoft: the fused UNet's and VAE decoder's channels-last convolutions) adds its bias with that op too; its
output is [N, H, W, M], so its Add reads the bias as it is, [M], over the last axis.

ONNX Runtime folds such an ``Add`` back into the convolution at session creation (its ``ConvAddFusion`` rewrite),
unless the session disables that rewrite: the export records ``DISABLED_OPTIMIZERS`` in the component's manifest
entry and the runtime's session factory passes them (``optimization.disable_specified_optimizers``).
"""

from __future__ import annotations

from .graph_index import GraphIndex, drop_unread_initializers

DISABLED_OPTIMIZERS = ("ConvAddFusion",)
# ONNX Runtime's CUDA kernels of these add their bias with cuDNN's op: op type → whether the output is channels-last
_CONVOLUTIONS = {("", "Conv"): False, ("", "ConvTranspose"): False, ("com.microsoft", "NhwcConv"): True}


def _initializer_behind(index: GraphIndex, name: str):
    """The initializer tensor ``name`` is, itself or through ``Identity`` nodes, or None. (The TorchScript exporter
    writes equal initializers once and the others as an Identity of it: the random-weight vocoder's zero biases.)"""
    while name not in index.inits:
        node = index.producer.get(name)
        if node is None or node.op_type != "Identity":
            return None
        name = node.input[0]
    return index.inits[name]


def conv_bias_as_add(model) -> int:
    """Rewrite every ``Conv``, ``ConvTranspose`` and ``NhwcConv`` of ``model`` (an ``onnx.ModelProto``, in place) whose
    weight and 1-D bias are initializers (directly or through Identity nodes) as the convolution without its bias and
    an ``Add`` of that bias, reshaped to [M, 1, …] (one 1 per spatial axis of the weight; [M] as it is after an
    ``NhwcConv``, whose output is channels-last); the Add writes the convolution's old output, so readers are
    unchanged. Identity nodes and initializers read by nothing afterwards are removed. Returns
    how many convolutions were rewritten."""
    from onnx import helper, numpy_helper

    index = GraphIndex(model)
    inits = index.inits
    nodes, added, replaced, moved = [], [], set(), 0
    for node in index.nodes:
        nodes.append(node)
        channels_last = _CONVOLUTIONS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        if channels_last is None or len(node.input) < 3 or not node.input[2]:
            continue
        bias_init = _initializer_behind(index, node.input[2])
        weight = _initializer_behind(index, node.input[1])
        if bias_init is None or weight is None:
            continue
        bias = numpy_helper.to_array(bias_init)
        spatial = len(weight.dims) - 2
        if bias.ndim != 1 or spatial < 1:
            continue
        out = node.output[0]
        shaped = f"{bias_init.name}_last_axis" if channels_last else f"{bias_init.name}_over_{spatial}d"
        if shaped not in inits:
            over = bias if channels_last else bias.reshape(bias.shape + (1,) * spatial)
            inits[shaped] = numpy_helper.from_array(over, shaped)
            added.append(inits[shaped])
        replaced.update((node.input[2], bias_init.name))
        del node.input[2:]
        node.output[0] = f"{out}_without_bias"
        nodes.append(helper.make_node("Add", [node.output[0], shaped], [out], name=f"{node.name or out}_bias"))
        moved += 1
    if moved:
        read = {x for n in nodes for x in n.input} | {o.name for o in model.graph.output}
        unread = {name for name in replaced if name not in read}
        nodes = [n for n in nodes if not (n.op_type == "Identity" and n.output[0] in unread)]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(added)
        drop_unread_initializers(model, names=replaced)  # the 1-D biases, read by nothing now
    return moved
