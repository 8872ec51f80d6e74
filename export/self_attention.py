"""The text encoders' attention as ONNX Runtime's fused ``MultiHeadAttention``, and a Gemm's bias moved into the
``SkipLayerNormalization`` after it.

ONNX Runtime's transformer optimizer fuses GPT-2's layer norms and GELUs (``model_type="gpt2"``) but not the
attention of AudioLDM 2's GPT-2 graph, which the export writes itself (``wrappers.Gpt2Step``: one additive
causal-and-padding bias [B, 1, L, L] computed once, shared by every layer). Unfused, each layer's attention is a
Split, three head transposes, two batched GEMMs, a scale, a bias Add, a softmax and a transpose back: 12 of GPT-2's
24 kernels a layer (H100 profile, docs/results/kernels-2026-11-27-run-x.json), and the runtime runs the graph 8 times a
request. ``fuse_self_attention`` replaces each

    q, k, v [B, S, N·H] → Reshape [B, S, N, H] → Transpose (q, v: 0 2 1 3; k: 0 2 3 1)
    Softmax(Add(MatMul(q', k') ÷ c, bias)) → MatMul(·, v') → Transpose 0 2 1 3 → Reshape [B, S, N·H]

by ``MultiHeadAttention(q, k, v, attention_bias=bias, num_heads=N, scale=1/c)`` (``× c`` for a Mul: scale c), the
same function (softmax(q·kᵀ·scale + bias)·v per head). CLAP's text branch (transformers' RoBERTa) has the same
pattern with N written as −1 (read here from the projection's width) and a [B, 1, 1, L] padding bias, which
``bias_over_queries`` expands to [B, 1, S, L] once (``CLAP_TEXT_ATTENTION``, run CN). On CUDA GPT-2's fp16 node runs
as one memory-efficient attention kernel (the bias needs S a multiple of 8, which the runtime's GPT-2 buffer is:
``shapes.lm_buffer``); CLAP's rows are padded to such a length by the runtime since ``CLAP_TEXT_MEA`` (the default
since run CR, its manifest entry's ``length_multiple``).

``gemm_bias_into_skip_layer_norm``: GPT-2's attention output projection is ``Gemm(x, W, b)`` (transformers' Conv1D),
which ONNX Runtime runs as a bias broadcast and a GEMM, and its sum goes, through Reshapes, only into the next
``SkipLayerNormalization`` (``input + skip + bias``): with no bias of its own there, ``b`` moves into it and the Gemm
becomes a MatMul.

Both are exact in real arithmetic; tests/test_self_attention.py checks them on ONNX Runtime's CPU provider against
the graph before, and ``audioldm2-trt validate --device cuda`` the fp16 GPT-2 against PyTorch.
"""

from __future__ import annotations

import logging

import numpy as np

from .graph_index import GraphIndex

log = logging.getLogger("audioldm2_trt.export")

MS_DOMAIN = "com.microsoft"
_HEADS_FIRST = [0, 2, 1, 3]  # [B, S, N, H] ↔ [B, N, S, H]
_KEY_TRANSPOSED = [0, 2, 3, 1]  # [B, S, N, H] → [B, N, H, S]


def fuse_self_attention(model, bias_over_queries: bool = False) -> int:
    """Rewrite every attention of the module docstring's pattern in ``model`` (an ``onnx.ModelProto``, in place) as
    one ``MultiHeadAttention``; returns how many. Nodes left without readers are not removed here, nor is the
    com.microsoft opset declared (the caller, ``optimize.fuse``, prunes the graph and declares the domains its nodes
    use). An attention that differs anywhere from the pattern stays as it is.

    ``bias_over_queries``: the graph's softmax bias is a key-padding bias [B, 1, 1, L] (CLAP's RoBERTa), which
    ``MultiHeadAttention`` does not broadcast over the queries: each bias tensor is expanded once to [B, 1, S, L]
    (S read from the first attention's query) and that copy is shared by every attention that adds it."""
    from onnx import helper

    index = GraphIndex(model)
    replaced, expanded, fused = {}, {}, 0
    added: dict[int, list] = {}  # id(a replaced node) → the nodes expanding a bias, written before it
    for softmax in index.nodes:
        if softmax.op_type != "Softmax" or index.attr(softmax, "axis", -1) not in (-1, 3):
            continue
        match = _match(index, softmax)
        if match is None:
            continue
        q, k, v, bias, heads, scale, out_reshape = match
        if bias_over_queries:
            if bias not in expanded:  # before this attention: its query and the bias exist there
                expanded[bias] = f"{bias}_over_queries"
                added[id(out_reshape)] = _expand_over_queries(bias, q, expanded[bias])
            bias = expanded[bias]
        attention = helper.make_node("MultiHeadAttention", [q, k, v, "", "", bias], [out_reshape.output[0]],
                                     name=f"{softmax.name}_MultiHeadAttention", domain=MS_DOMAIN, num_heads=heads,
                                     scale=scale)
        replaced[id(out_reshape)] = attention
        fused += 1
    if fused:
        nodes = [m for n in model.graph.node for m in added.get(id(n), []) + [replaced.get(id(n), n)]]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if added:
            model.graph.initializer.extend(_expand_initializers())
    return fused


def _expand_initializers() -> list:
    from onnx import TensorProto, helper

    return [helper.make_tensor("self_attention_ones", TensorProto.INT64, [2], [1, 1]),
            helper.make_tensor("self_attention_one", TensorProto.INT64, [1], [1]),
            helper.make_tensor("self_attention_seq_axis", TensorProto.INT64, [1], [1])]


def _expand_over_queries(bias: str, query: str, out: str) -> list:
    """Nodes writing ``out`` = ``bias`` [B, 1, 1, L] expanded to [B, 1, S, L], S the length of ``query`` [B, S, D]."""
    from onnx import helper

    return [helper.make_node("Shape", [query], [f"{out}_qshape"], name=f"{out}_Shape"),
            helper.make_node("Gather", [f"{out}_qshape", "self_attention_seq_axis"], [f"{out}_qlen"], axis=0,
                             name=f"{out}_Gather"),
            helper.make_node("Concat", ["self_attention_ones", f"{out}_qlen", "self_attention_one"], [f"{out}_shape"],
                             axis=0, name=f"{out}_Concat"),
            helper.make_node("Expand", [bias, f"{out}_shape"], [out], name=f"{out}_Expand")]


def _match(index: GraphIndex, softmax):
    """(q, k, v, bias, heads, scale, the output Reshape) of the attention around ``softmax``, or None."""
    add = index.producer.get(softmax.input[0])
    if add is None or add.op_type != "Add" or not index.only_reader(add.output[0], softmax):
        return None
    for scaled_name, bias in (add.input, add.input[::-1]):
        scaled = index.producer.get(scaled_name)
        if scaled is not None and scaled.op_type in ("Div", "Mul") and index.only_reader(scaled_name, add):
            break
    else:
        return None
    factor = index.constant(scaled.input[1])
    scores = index.producer.get(scaled.input[0])
    if (factor is None or factor.size != 1 or scores is None or scores.op_type != "MatMul"
            or not index.only_reader(scores.output[0], scaled)):
        return None
    factor = float(np.asarray(factor).reshape(()))
    scale = 1.0 / factor if scaled.op_type == "Div" else factor
    q, q_heads = _heads(index, scores.input[0], scores, _HEADS_FIRST)
    k, k_heads = _heads(index, scores.input[1], scores, _KEY_TRANSPOSED)
    readers = index.readers.get(softmax.output[0], [])
    if (q is None or k is None or len(readers) != 1 or readers[0].op_type != "MatMul"
            or readers[0].input[0] != softmax.output[0]):
        return None
    context = readers[0]
    v, v_heads = _heads(index, context.input[1], context, _HEADS_FIRST)
    back = _only_reader_of(index, context.output[0], "Transpose")
    out = _only_reader_of(index, back.output[0], "Reshape") if back is not None else None
    if (v is None or back is None or index.attr(back, "perm", None) != _HEADS_FIRST or out is None
            or len(_shape_pieces(index, out.input[1]) or ()) != 3 or not q_heads == k_heads == v_heads or not q_heads):
        return None
    return q, k, v, bias, q_heads, scale, out


def _heads(index: GraphIndex, name: str, reader, perm):
    """(x, N) if tensor ``name`` is Transpose(``perm``)(Reshape(x, [B, S, N, H])), each the only reader of its input
    and N a constant of the Reshape's shape (``_shape_pieces``); (None, None) otherwise."""
    transpose = index.producer.get(name)
    if transpose is None or transpose.op_type != "Transpose" or index.attr(transpose, "perm", None) != perm \
            or not index.only_reader(name, reader):
        return None, None
    reshape = index.producer.get(transpose.input[0])
    if reshape is None or reshape.op_type != "Reshape" or not index.only_reader(transpose.input[0], transpose):
        return None, None
    pieces = _shape_pieces(index, reshape.input[1])
    heads = pieces[2] if pieces is not None and len(pieces) == 4 else None
    if heads == -1 and pieces[3] is not None and pieces[3] > 0:  # [B, S, -1, H] (transformers' RoBERTa): N = D / H
        width = _width(index, reshape.input[0])
        heads = width // pieces[3] if width is not None and width % pieces[3] == 0 else None
    return (reshape.input[0], heads) if heads is not None and heads > 0 else (None, None)


def _width(index: GraphIndex, name: str) -> int | None:
    """The last dimension of tensor ``name`` where it is a projection's: ``MatMul(x, W)`` with W a 2-D initializer,
    or that plus a 1-D initializer bias (``_biased_projection``); None otherwise."""
    biased = _biased_projection(index, name)
    if biased is not None:
        return int(biased[1].size)
    node = index.producer.get(name)
    if node is not None and node.op_type == "MatMul":
        weight = index.initializer(node.input[1])
        return int(weight.shape[1]) if weight is not None and weight.ndim == 2 else None
    return None


def _biased_projection(index: GraphIndex, name: str):
    """(MatMul(x, W)'s output, b) where tensor ``name`` is ``Add(MatMul(x, W), b)`` (either order), W a 2-D and b a
    1-D initializer of W's width; None otherwise."""
    add = index.producer.get(name)
    if add is None or add.op_type != "Add":
        return None
    for product, bias_name in (add.input, add.input[::-1]):
        bias, matmul = index.initializer(bias_name), index.producer.get(product)
        if bias is None or bias.ndim != 1 or matmul is None or matmul.op_type != "MatMul":
            continue
        weight = index.initializer(matmul.input[1])
        if weight is not None and weight.ndim == 2 and weight.shape[1] == bias.size:
            return product, bias
    return None


def qkv_bias_into_attention(model) -> int:
    """Move the biases of each ``MultiHeadAttention``'s query, key and value projections into its ``bias`` input
    (one [3·D] initializer, q's then k's then v's): where each of the three inputs is a ``_biased_projection``, read
    by that attention alone (or by ``Shape`` nodes too, which then read the MatMul), and the node has no bias yet, the
    attention reads the MatMuls' outputs instead. ONNX Runtime adds the bias in the kernel that lays Q, K and V out
    for the attention, so three Add kernels a layer go. ``model``: an ``onnx.ModelProto`` whose unread nodes are
    pruned already (in place); returns how many attentions took their biases."""
    from onnx import numpy_helper

    index = GraphIndex(model)
    moved = 0
    for node in index.nodes:
        if node.domain != MS_DOMAIN or node.op_type != "MultiHeadAttention" or len(node.input) < 3 \
                or (len(node.input) > 3 and node.input[3]):
            continue
        found = [_projection_bias(index, name, node) for name in node.input[:3]]
        if any(f is None for f in found) or len({b.dtype for _, b in found}) != 1:
            continue
        for name, (product, _) in zip(node.input[:3], found):  # Shape readers (bias_over_queries') read the MatMul
            for shape in index.readers.get(name, []):
                if shape is not node:
                    shape.input[0] = product
        bias_name = f"{node.name}_qkv_bias"
        model.graph.initializer.append(numpy_helper.from_array(np.concatenate([b for _, b in found]), bias_name))
        inputs = [product for product, _ in found] + [bias_name] + list(node.input[4:])
        del node.input[:]
        node.input.extend(inputs)
        moved += 1
    return moved


def _projection_bias(index: GraphIndex, name: str, reader):
    """``_biased_projection(name)`` where tensor ``name`` is read by ``reader`` and otherwise only by ``Shape`` nodes
    (which read the same shape from the MatMul), and is no graph output; None otherwise."""
    readers = index.readers.get(name, [])
    if name in index.outputs or not any(r is reader for r in readers) \
            or any(r is not reader and r.op_type != "Shape" for r in readers):
        return None
    return _biased_projection(index, name)


def gemm_bias_into_skip_layer_norm(model) -> int:
    """Move the bias of each ``Gemm(x, W, b)`` (alpha = beta = 1, no transposes, b [D]) whose output reaches, through
    Reshapes keeping D the last axis, only a ``SkipLayerNormalization`` without a bias, into that node's bias input;
    the Gemm becomes ``MatMul(x, W)``. ``model``: an ``onnx.ModelProto``, in place; returns how many moved."""
    from onnx import helper

    index = GraphIndex(model)
    moved = 0
    for gemm in index.nodes:
        if gemm.op_type != "Gemm" or len(gemm.input) < 3 or not gemm.input[2]:
            continue
        if tuple(index.attr(gemm, a, d) for a, d in (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0))) \
                != (1, 1, 0, 0):
            continue
        weight, bias = index.initializer(gemm.input[1]), index.initializer(gemm.input[2])
        if weight is None or bias is None or bias.shape != (weight.shape[1],):
            continue
        norm, tensor = None, gemm.output[0]
        while norm is None:
            readers = index.readers.get(tensor, [])
            if len(readers) != 1 or tensor in index.outputs:
                break
            reader = readers[0]
            target = _shape_pieces(index, reader.input[1]) if reader.op_type == "Reshape" else None
            if target and reader.input[0] == tensor and target[-1] == bias.size:  # a Reshape keeping D the last axis
                tensor = reader.output[0]
            elif reader.op_type == "SkipLayerNormalization" and tensor in reader.input[:2] \
                    and (len(reader.input) < 5 or not reader.input[4]):
                norm = reader
            else:
                break
        if norm is None:
            continue
        inputs = list(norm.input) + [""] * (5 - len(norm.input))
        inputs[4] = gemm.input[2]
        del norm.input[:]
        norm.input.extend(inputs)
        matmul = helper.make_node("MatMul", list(gemm.input[:2]), list(gemm.output), name=f"{gemm.name}_MatMul")
        gemm.CopyFrom(matmul)
        moved += 1
    return moved


def _shape_pieces(index: GraphIndex, name: str) -> list | None:
    """The entries of the shape tensor ``name``, each an int where it is a constant, else None: a constant shape, or a
    Concat of constants and of computed pieces taken as one entry each (the exporter's Unsqueeze of a gathered
    dimension); None for any other shape."""
    shape = index.constant(name)
    if shape is not None:
        return [int(x) for x in shape.reshape(-1)]
    concat = index.producer.get(name)
    if concat is None or concat.op_type != "Concat":
        return None
    pieces = []
    for piece in concat.input:
        value = index.constant(piece)
        pieces += [None] if value is None else [int(x) for x in value.reshape(-1)]
    return pieces


def _only_reader_of(index: GraphIndex, name: str, op_type: str):
    readers = index.readers.get(name, [])
    if len(readers) == 1 and readers[0].op_type == op_type and name not in index.outputs:
        return readers[0]
    return None
