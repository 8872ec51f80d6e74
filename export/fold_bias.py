"""Per-channel biases moved into a fused node that adds a bias anyway: fewer kernels, the same sums.

ONNX Runtime's CUDA provider adds a convolution's bias in a cuDNN kernel of its own (``cudnnAddTensor``; 67 launches a
UNet step, run X), a Gemm's bias in a ``BroadcastBiasKernel`` before the GEMM, and an ``Add`` after a MatMul as an
element-wise kernel. In the fused UNet many of those sums flow only into a ``SkipGroupNorm``, which computes
``X + skip + bias`` (bias [C], channels last) before it normalises, and outputs that sum; adding the bias there
instead costs nothing. Two rewrites, exact in real arithmetic, on the fused fp32 graph before fp16 conversion:

1. **into SkipGroupNorm**: the bias of an ``NhwcConv`` whose output is the node's X or skip (a ResNet's ``conv1``,
   ``conv2`` and ``conv_shortcut``), and the bias ``C`` of a ``Gemm`` whose output, unsqueezed to [N, 1, 1, C], is
   its skip (a ResNet's time-embedding projection). Both biases of one node are summed into one.
2. **through a linear map**: ``Add(h, b) → Add(·, r) → MatMul(·, W) → … + b'`` becomes ``Add(h, r) → MatMul(·, W)
   → … + (b' + b·W)``: each transformer's feed-forward output bias, folded into ``proj_out``'s (which ONNX Runtime
   adds in the next SkipGroupNorm, or in an ``Add``).

A tensor is rewritten only if the node it feeds is its one reader and it is not a graph output. New biases are
computed in float64 from the fp32 initializers and stored as new fp32 initializers (shared ones are never edited).
"""

from __future__ import annotations

MS_DOMAIN = "com.microsoft"


def fold_biases(model) -> dict[str, int]:
    """Apply both rewrites to ``model`` (an ``onnx.ModelProto``, fp32 initializers) in place.

    Returns how many biases moved: ``{"conv": n, "gemm": n, "linear": n}`` (NhwcConv and Gemm biases into a
    SkipGroupNorm, Add biases folded through a MatMul)."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in nodes for out in node.output}
    readers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def only_reader(name: str, node) -> bool:
        return name not in outputs and [id(n) for n in readers.get(name, [])] == [id(node)]

    def vector(name: str, size: int | None = None):
        """A 1-D float32 initializer as float64 (of ``size`` elements if given); None otherwise."""
        tensor = inits.get(name)
        if tensor is None or tensor.data_type != 1:  # FLOAT
            return None
        value = numpy_helper.to_array(tensor)
        if value.ndim != 1 or (size is not None and value.size != size):
            return None
        return value.astype(np.float64)

    def attr(node, name: str, default):
        for a in node.attribute:
            if a.name == name:
                return a.f if a.type == a.FLOAT else a.i
        return default

    def keeps_last_axis(node, rank_in: int) -> bool:
        """An Unsqueeze whose new axes leave the input's last axis last (constant axes input, opset 13+)."""
        axes = numpy_helper.to_array(inits[node.input[1]]) if len(node.input) > 1 and node.input[1] in inits else None
        if axes is None:
            return False
        rank_out = rank_in + axes.size
        return all(int(a) % rank_out != rank_out - 1 for a in axes.reshape(-1))

    def last_dim(shape: str) -> int | None:
        """The last entry of a Reshape's target shape: from an initializer, or from the last input of the Concat
        that builds it (the fused UNet's [N, H, W, C] with N, H, W read at run time)."""
        if shape in inits:
            value = numpy_helper.to_array(inits[shape]).reshape(-1)
            return int(value[-1]) if value.size else None
        concat = producer.get(shape)
        if concat is None or concat.op_type != "Concat" or attr(concat, "axis", None) not in (0, -1) \
                or concat.input[-1] not in inits:
            return None
        value = numpy_helper.to_array(inits[concat.input[-1]]).reshape(-1)
        return int(value[-1]) if value.size else None

    # New bias per SkipGroupNorm / Add (id → (node, input index, float64 value)), written at the end.
    new_bias: dict[int, list] = {}
    counts = {"conv": 0, "gemm": 0, "linear": 0}

    def bias_slot(node, channels: int):
        """The running bias of a SkipGroupNorm (its bias input or zeros), or None if that input is not a vector."""
        if id(node) not in new_bias:
            if len(node.input) > 4 and node.input[4]:
                value = vector(node.input[4], channels)
                if value is None:
                    return None
            else:
                value = np.zeros(channels)
            new_bias[id(node)] = [node, 4, value]
        return new_bias[id(node)]

    # 1. NhwcConv and Gemm biases into the SkipGroupNorm they feed.
    for norm in nodes:
        if norm.op_type != "SkipGroupNorm" or norm.domain != MS_DOMAIN or not attr(norm, "channels_last", 1):
            continue
        gamma = vector(norm.input[1])
        if gamma is None:
            continue
        channels = gamma.size
        for name in (norm.input[0], norm.input[3]):
            source = producer.get(name)
            if source is None or not only_reader(name, norm):
                continue
            if source.op_type == "NhwcConv" and source.domain == MS_DOMAIN and len(source.input) == 3:
                bias = vector(source.input[2], channels)
                slot = bias_slot(norm, channels) if bias is not None else None
                if slot is None:
                    continue
                slot[2] = slot[2] + bias
                del source.input[2]
                counts["conv"] += 1
            elif name == norm.input[3] and source.op_type == "Unsqueeze":
                chain = [source]
                while chain[-1].op_type == "Unsqueeze" and chain[-1].input[0] in producer \
                        and only_reader(chain[-1].input[0], chain[-1]):
                    chain.append(producer[chain[-1].input[0]])
                gemm = chain[-1]
                if gemm.op_type != "Gemm" or len(gemm.input) != 3 or attr(gemm, "beta", 1.0) != 1.0:
                    continue
                rank = 2  # Gemm's output is [N, C]
                ok = True
                for unsqueeze in reversed(chain[:-1]):
                    if not keeps_last_axis(unsqueeze, rank):
                        ok = False
                        break
                    rank += numpy_helper.to_array(inits[unsqueeze.input[1]]).size
                bias = vector(gemm.input[2], channels) if ok else None
                slot = bias_slot(norm, channels) if bias is not None else None
                if slot is None:
                    continue
                slot[2] = slot[2] + bias
                del gemm.input[2]
                counts["gemm"] += 1

    # 2. Add(h, b) → Add(·, r) → MatMul(·, W) → [Reshape] → bias b' (an Add or a SkipGroupNorm): b' += b·W.
    dropped = set()
    for add in nodes:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        consts = [k for k, name in enumerate(add.input) if name in inits]
        if len(consts) != 1:
            continue
        bias = vector(add.input[consts[0]])
        residual_adds = readers.get(add.output[0], [])
        if bias is None or len(residual_adds) != 1 or not only_reader(add.output[0], residual_adds[0]):
            continue
        residual = residual_adds[0]
        if residual.op_type != "Add" or any(name in inits for name in residual.input):
            continue
        matmuls = readers.get(residual.output[0], [])
        if len(matmuls) != 1 or matmuls[0].op_type != "MatMul" or not only_reader(residual.output[0], matmuls[0]) \
                or matmuls[0].input[0] != residual.output[0] or matmuls[0].input[1] not in inits:
            continue
        matmul = matmuls[0]
        weight = numpy_helper.to_array(inits[matmul.input[1]])
        if weight.ndim != 2 or weight.shape[0] != bias.size or inits[matmul.input[1]].data_type != 1:
            continue
        target, tensor = None, matmul.output[0]
        while True:  # through Reshapes that keep the last axis (the MatMul's output features)
            nxt = readers.get(tensor, [])
            if len(nxt) != 1 or not only_reader(tensor, nxt[0]):
                break
            node = nxt[0]
            if node.op_type == "Reshape" and node.input[0] == tensor:
                if last_dim(node.input[1]) != weight.shape[1]:
                    break
                tensor = node.output[0]
                continue
            if node.op_type == "SkipGroupNorm" and node.domain == MS_DOMAIN and tensor in (node.input[0], node.input[3]) \
                    and attr(node, "channels_last", 1):
                slot = bias_slot(node, weight.shape[1])
                target = slot
            elif node.op_type == "Add" and len(node.input) == 2:
                k = 1 - list(node.input).index(tensor) if tensor in node.input else None
                if k is not None and node.input[k] in inits:
                    if id(node) not in new_bias:
                        value = vector(node.input[k], weight.shape[1])
                        if value is not None:
                            new_bias[id(node)] = [node, k, value]
                    target = new_bias.get(id(node))
            break
        if target is None:
            continue
        target[2] = target[2] + bias @ weight.astype(np.float64)
        h = add.input[1 - consts[0]]
        residual.input[list(residual.input).index(add.output[0])] = h
        dropped.add(id(add))
        counts["linear"] += 1

    for k, (node, index, value) in enumerate(new_bias.values()):
        name = f"folded_bias_{k}_{node.name or node.op_type}"
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name
    if dropped:
        kept = [node for node in nodes if id(node) not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
    return counts
