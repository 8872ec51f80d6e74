"""Per-channel biases moved into a fused node that adds a bias anyway: fewer kernels, the same sums.

ONNX Runtime's CUDA provider adds a convolution's bias in a cuDNN kernel of its own (``cudnnAddTensor``; 67 launches a
UNet step, run X), a Gemm's bias in a ``BroadcastBiasKernel`` before the GEMM, and an ``Add`` after a MatMul as an
element-wise kernel. In the fused UNet many of those sums flow only into a ``SkipGroupNorm``, which computes
``X + skip + bias`` (bias [C], channels last) before it normalises, and outputs that sum; adding the bias there
instead costs nothing. Three rewrites, exact in real arithmetic, on the fused fp32 graph before fp16 conversion:

1. **into SkipGroupNorm**: the bias of an ``NhwcConv`` whose output is the node's X or skip (a ResNet's ``conv1``,
   ``conv2`` and ``conv_shortcut``), and the bias ``C`` of a ``Gemm`` whose output, unsqueezed to [N, 1, 1, C], is
   its skip (a ResNet's time-embedding projection). Both biases of one node are summed into one.
2. **through a linear map**: ``Add(h, b) → Add(·, r) → MatMul(·, W) → … + b'`` becomes ``Add(h, r) → MatMul(·, W)
   → … + (b' + b·W)``: each transformer's feed-forward output bias, folded into ``proj_out``'s (which ONNX Runtime
   adds in the next SkipGroupNorm, or in an ``Add``).
3. **into a SkipLayerNormalization**: ``m = MatMul(x, W); s = Add(m, b); LayerNorm(s)``, with ``s`` also read
   elsewhere (each transformer's ``proj_in`` bias: ``s`` is the residual stream, its LayerNorm ``norm1``), becomes
   ``m' = MatMul(x, W/2); SkipLayerNormalization(m', m', gamma, beta, bias=b)``, whose outputs are the LayerNorm's
   and, as ``input_skip_bias_sum``, ``m' + m' + b = s`` for the other readers: one kernel for the Add and the
   LayerNorm. Halving is exact (a power of two) but for weights that become fp16 subnormals (|w| < 1.2e-4), whose
   absolute rounding stays under 3e-8.

A tensor is rewritten only if the node it feeds is its one reader and it is not a graph output. New biases are
computed in float64 from the fp32 initializers and stored as new fp32 initializers (shared ones are never edited).
In fp16 the sums round in other places (SkipGroupNorm adds the bias in half precision, where cuDNN's bias add and
the Gemm's epilogue worked in float): on the UNet the 100-prompt fidelity did not move, on the VAE decoder it got
worse, so only ``UNET_FUSED`` uses this (components.py; H100 figures in docs/benchmarks.md, run AD).
"""

from __future__ import annotations

from .graph_index import GraphIndex

MS_DOMAIN = "com.microsoft"
FLOAT = 1  # onnx.TensorProto.FLOAT


REWRITES = ("skip_group_norm", "linear_map", "layer_norm")  # the module docstring's 1, 2 and 3


def fold_biases(model, rewrites=REWRITES) -> dict[str, int]:
    """Apply the ``rewrites`` named (of ``REWRITES``) to ``model`` (an ``onnx.ModelProto``, fp32 initializers) in place.

    Returns how many biases moved: ``{"conv": n, "gemm": n, "linear": n, "layer_norm": n}`` (NhwcConv and Gemm
    biases into a SkipGroupNorm, Add biases folded through a MatMul, Add biases into a SkipLayerNormalization)."""
    unknown = set(rewrites) - set(REWRITES)
    if unknown:
        raise ValueError(f"unknown bias rewrites {sorted(unknown)}; known: {REWRITES}")
    graph = _Graph(model)
    counts = {"conv": 0, "gemm": 0, "linear": 0, "layer_norm": 0}
    if "skip_group_norm" in rewrites:
        for norm in graph.nodes:
            if graph.is_skip_group_norm(norm):
                for kind in _into_skip_group_norm(graph, norm):
                    counts[kind] += 1
    if "linear_map" in rewrites:
        counts["linear"] = sum(_through_linear_map(graph, add) for add in graph.nodes if add.op_type == "Add")
    if "layer_norm" in rewrites:
        counts["layer_norm"] = sum(_into_skip_layer_norm(graph, add) for add in graph.nodes
                                   if add.op_type == "Add" and id(add) not in graph.dropped)
    graph.write()
    if counts["layer_norm"] and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        from onnx.helper import make_opsetid

        model.opset_import.append(make_opsetid(MS_DOMAIN, 1))
    return counts


class _Graph(GraphIndex):
    """The graph index, with the biases rewritten so far and the nodes to drop (written by ``write``)."""

    def __init__(self, model):
        super().__init__(model)
        self.new_bias: dict[int, list] = {}  # id(node) → [node, input index, float64 value]
        self.dropped: set[int] = set()
        self.replaced: dict[int, object] = {}  # id(node) → the node written in its place

    def vector(self, name: str, size: int | None = None):
        """A 1-D float32 initializer as float64 (of ``size`` elements if given); None otherwise."""
        import numpy as np

        if name not in self.inits or self.inits[name].data_type != FLOAT:
            return None
        value = self.initializer(name)
        if value.ndim != 1 or (size is not None and value.size != size):
            return None
        return value.astype(np.float64)

    def is_skip_group_norm(self, node) -> bool:
        return node.op_type == "SkipGroupNorm" and node.domain == MS_DOMAIN and bool(self.attr(node, "channels_last", 1))

    def bias_of(self, node, index: int, channels: int):
        """The running new bias of ``node``'s input ``index`` (its initializer, or zeros where a SkipGroupNorm has
        none), as a mutable [node, index, value]; None if that input is not a float vector of ``channels``."""
        import numpy as np

        if id(node) not in self.new_bias:
            present = len(node.input) > index and node.input[index]
            value = self.vector(node.input[index], channels) if present else np.zeros(channels)
            if value is None:
                return None
            self.new_bias[id(node)] = [node, index, value]
        return self.new_bias[id(node)]

    def last_dim(self, shape: str) -> int | None:
        """The last entry of a Reshape's target shape: from an initializer, or from the last input of the Concat that
        builds it (the fused UNet's [N, H, W, C] with N, H, W read at run time)."""
        concat = self.producer.get(shape)
        if shape not in self.inits and concat is not None and concat.op_type == "Concat" \
                and self.attr(concat, "axis", None) in (0, -1):
            shape = concat.input[-1]
        value = self.initializer(shape)
        return int(value.reshape(-1)[-1]) if value is not None and value.size else None

    def write(self) -> None:
        """Store each new bias as a new fp32 initializer, point its node at it, and remove the dropped nodes."""
        import numpy as np
        from onnx import numpy_helper

        graph = self.model.graph
        for k, (node, index, value) in enumerate(self.new_bias.values()):
            name = f"folded_bias_{k}_{node.name or node.op_type}"
            graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
            while len(node.input) <= index:
                node.input.append("")
            node.input[index] = name
        if self.dropped or self.replaced:
            kept = [self.replaced.get(id(node), node) for node in self.nodes if id(node) not in self.dropped]
            del graph.node[:]
            graph.node.extend(kept)


def _into_skip_group_norm(graph: _Graph, norm) -> list[str]:
    """Rewrite 1 for one SkipGroupNorm: move the bias of the NhwcConv that writes its X or skip, and of the Gemm whose
    output, unsqueezed to [N, 1, 1, C], is its skip; returns what moved ("conv" / "gemm" each)."""
    gamma = graph.vector(norm.input[1])
    if gamma is None:
        return []
    channels, moved = gamma.size, []
    for name in (norm.input[0], norm.input[3]):
        source = graph.producer.get(name)
        if source is None or not graph.only_reader(name, norm):
            continue
        if source.op_type == "NhwcConv" and source.domain == MS_DOMAIN and len(source.input) == 3:
            owner, kind = source, "conv"
        elif name == norm.input[3] and source.op_type == "Unsqueeze":
            owner, kind = _gemm_under_unsqueezes(graph, source), "gemm"
        else:
            continue
        bias = graph.vector(owner.input[2], channels) if owner is not None else None
        slot = graph.bias_of(norm, 4, channels) if bias is not None else None
        if slot is None:
            continue
        slot[2] = slot[2] + bias
        del owner.input[2]
        moved.append(kind)
    return moved


def _gemm_under_unsqueezes(graph: _Graph, unsqueeze):
    """The Gemm (with a bias, beta 1) whose [N, C] output reaches ``unsqueeze``'s output through Unsqueezes that keep
    C the last axis, each the only reader of its input; None otherwise."""
    chain = [unsqueeze]
    while chain[-1].op_type == "Unsqueeze" and chain[-1].input[0] in graph.producer \
            and graph.only_reader(chain[-1].input[0], chain[-1]):
        chain.append(graph.producer[chain[-1].input[0]])
    gemm = chain[-1]
    if gemm.op_type != "Gemm" or len(gemm.input) != 3 or graph.attr(gemm, "beta", 1.0) != 1.0:
        return None
    rank = 2
    for node in reversed(chain[:-1]):
        axes = graph.initializer(node.input[1]) if len(node.input) > 1 else None
        if axes is None:
            return None
        rank += axes.size
        if any(int(a) % rank == rank - 1 for a in axes.reshape(-1)):  # a new axis after C
            return None
    return gemm


def _through_linear_map(graph: _Graph, add) -> bool:
    """Rewrite 2 for one Add(h, b): if its sum only reaches Add(·, r) → MatMul(·, W) → [Reshapes keeping the last
    axis] → a bias b' (a SkipGroupNorm's, or an Add's initializer), drop it and add b·W to b'. True if it folded."""
    import numpy as np

    consts = [k for k, name in enumerate(add.input) if name in graph.inits]
    bias = graph.vector(add.input[consts[0]]) if len(add.input) == 2 and len(consts) == 1 else None
    residual = graph.readers.get(add.output[0], [None])[0]
    if bias is None or residual is None or not graph.only_reader(add.output[0], residual) \
            or residual.op_type != "Add" or any(name in graph.inits for name in residual.input):
        return False
    matmul = graph.readers.get(residual.output[0], [None])[0]
    if matmul is None or matmul.op_type != "MatMul" or not graph.only_reader(residual.output[0], matmul) \
            or matmul.input[0] != residual.output[0] or graph.inits.get(matmul.input[1]) is None \
            or graph.inits[matmul.input[1]].data_type != FLOAT:
        return False
    weight = graph.initializer(matmul.input[1])
    if weight.ndim != 2 or weight.shape[0] != bias.size:
        return False
    target = _bias_after(graph, matmul.output[0], weight.shape[1])
    if target is None:
        return False
    target[2] = target[2] + bias @ weight.astype(np.float64)
    residual.input[list(residual.input).index(add.output[0])] = add.input[1 - consts[0]]
    graph.dropped.add(id(add))
    return True


def _bias_after(graph: _Graph, tensor: str, features: int):
    """The bias slot (see ``_Graph.bias_of``) that adds a [features] bias to ``tensor``, its only reader after
    Reshapes that keep the last axis: a SkipGroupNorm reading it as X or skip, or an Add with an initializer."""
    while True:
        nxt = graph.readers.get(tensor, [None])[0]
        if nxt is None or not graph.only_reader(tensor, nxt):
            return None
        if nxt.op_type == "Reshape" and nxt.input[0] == tensor and graph.last_dim(nxt.input[1]) == features:
            tensor = nxt.output[0]
            continue
        if graph.is_skip_group_norm(nxt) and tensor in (nxt.input[0], nxt.input[3]):
            return graph.bias_of(nxt, 4, features)
        if nxt.op_type == "Add" and len(nxt.input) == 2 and nxt.input[0] != nxt.input[1]:
            other = 1 - list(nxt.input).index(tensor)
            return graph.bias_of(nxt, other, features) if nxt.input[other] in graph.inits else None
        return None


def _into_skip_layer_norm(graph: _Graph, add) -> bool:
    """Rewrite 3 for one Add(m, b): if m is a MatMul's output with a weight of its own, only this Add reads m, and one
    LayerNormalization over the last axis reads the sum (others may too), write SkipLayerNormalization(m', m', gamma,
    beta, bias=b) in the Add's place with the MatMul's weight halved (m' = m/2); its sum output keeps the Add's output
    name for the other readers. True if it was rewritten."""
    from onnx import helper, numpy_helper

    consts = [k for k, name in enumerate(add.input) if name in graph.inits]
    if len(add.input) != 2 or len(consts) != 1 or add.output[0] in graph.outputs:
        return False
    m = add.input[1 - consts[0]]
    bias = graph.vector(add.input[consts[0]])
    matmul = graph.producer.get(m)
    if bias is None or matmul is None or matmul.op_type != "MatMul" or matmul.input[0] == matmul.input[1] \
            or not graph.only_reader(m, add) or not graph.only_reader(matmul.input[1], matmul):
        return False
    weight = graph.initializer(matmul.input[1]) if graph.inits[matmul.input[1]].data_type == FLOAT else None
    norms = [n for n in graph.readers.get(add.output[0], []) if n.op_type == "LayerNormalization"]
    if weight is None or weight.ndim != 2 or weight.shape[1] != bias.size or len(norms) != 1:
        return False
    norm = norms[0]
    gamma = graph.vector(norm.input[1], bias.size) if len(norm.input) > 1 else None
    beta = norm.input[2] if len(norm.input) > 2 else ""
    if norm.input[0] != add.output[0] or gamma is None or graph.attr(norm, "axis", -1) != -1 \
            or any(norm.output[1:]) or (beta and graph.vector(beta, bias.size) is None) \
            or any(n.domain not in ("", "ai.onnx") for n in (norm, add)):
        return False
    graph.inits[matmul.input[1]].CopyFrom(numpy_helper.from_array(weight / 2, matmul.input[1]))
    fused = helper.make_node(
        "SkipLayerNormalization", [m, m, norm.input[1], beta, add.input[consts[0]]],
        [norm.output[0], "", "", add.output[0]], name=f"SkipLayerNorm_{norm.name or add.name}", domain=MS_DOMAIN,
        epsilon=float(graph.attr(norm, "epsilon", 1e-5)))
    graph.replaced[id(add)] = fused
    graph.dropped.add(id(norm))
    return True
