"""Sibling GEMMs — several ``Gemm`` nodes that read one input, each with a weight of its own and an output of the
same width — as one ``Gemm`` over the weights side by side, and a ``Split`` that hands each reader its columns.

In AudioLDM 2's UNet every ResNet projects the one time embedding with its own ``time_emb_proj``: 22 GEMMs of
[2, 1280] × [1280, C] a denoising step (full size; C = 128, 256, 384 or 640: 5, 5, 5 and 7 ResNets), each a
launch-bound kernel of ~3.4 µs (run AN's profile: 75 µs a step for 22 launches) reading 0.3–1.6 MiB of weights.
Merged by width they are 4 GEMMs and 4 Splits a step. The sums are the same dot products (each output column still
reads its own weight column and the same input); only cuBLAS's choice of kernel for the wider shape differs.

Only outputs of one width share a GEMM: ONNX Runtime's CUDA ``Split`` hands a kernel up to 32 equal parts' pointers
as a kernel argument, but copies the pointer and size arrays of unequal parts (or of more than 32) from pinned host
buffers at each run — copies that a captured CUDA graph records by host address and replays after ONNX Runtime has
handed those buffers back to its allocator (fixed upstream in onnxruntime PR 32121, which releases may lack). So a
group is at most ``MAX_SPLIT_OUTPUTS`` GEMMs of one output width.

The rewrite runs on the fused fp32 graph, after fold_bias.py has moved those GEMMs' biases into the SkipGroupNorm
after them, and before fp16 conversion. Eligible: ``Gemm`` (default domain) with ``transA`` 0, ``alpha`` 1, its
weight ``B`` a 2-D initializer, and either no ``C`` or a 1-D initializer ``C`` with ``beta`` 1. Siblings are grouped
by (input, ``transB``, whether they have ``C``, weight dtype, output width); groups of two or more are merged. A
merged group's outputs keep their names, so their readers are untouched. Weights shared with other nodes are copied,
never edited.
"""

from __future__ import annotations

from .graph_index import GraphIndex, drop_unread_initializers

# ONNX Runtime's CUDA Split passes up to 32 equal parts' pointers as a kernel argument (module docstring); larger
# groups are merged 32 at a time.
MAX_SPLIT_OUTPUTS = 32


def merge_sibling_gemms(model) -> dict[str, int]:
    """Merge every group of sibling GEMMs of ``model`` (an ``onnx.ModelProto``) in place.

    Returns ``{"groups": g, "gemms": n}``: g groups of n GEMMs in all became g GEMMs and g Splits (of equal parts)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = GraphIndex(model)
    groups: dict[tuple, list] = {}
    for node in graph.nodes:
        key = _sibling_key(graph, node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    merged_nodes: dict[int, list] = {}  # id(first node of a group) → the nodes written in its place
    dropped: set[int] = set()
    replaced: set[str] = set()  # the merged GEMMs' own weights and biases, dropped below where nothing else reads them
    counts = {"groups": 0, "gemms": 0}
    chunks = [(key, nodes[i: i + MAX_SPLIT_OUTPUTS]) for key, nodes in groups.items()
              for i in range(0, len(nodes), MAX_SPLIT_OUTPUTS)]
    for (source, trans_b, has_bias, _, width), nodes in chunks:
        if len(nodes) < 2:
            continue
        weights = [graph.initializer(n.input[1]) for n in nodes]
        widths = [width] * len(nodes)
        stem = f"merged_gemm_{counts['groups']}"
        inits = [numpy_helper.from_array(np.concatenate(weights, axis=0 if trans_b else 1), f"{stem}_weight"),
                 numpy_helper.from_array(np.array(widths, dtype=np.int64), f"{stem}_widths")]
        inputs = [source, inits[0].name]
        if has_bias:
            inits.append(numpy_helper.from_array(np.concatenate([graph.initializer(n.input[2]) for n in nodes]),
                                                 f"{stem}_bias"))
            inputs.append(inits[2].name)
        model.graph.initializer.extend(inits)
        gemm = helper.make_node("Gemm", inputs, [f"{stem}_out"], name=stem, transB=trans_b)
        split = helper.make_node("Split", [gemm.output[0], inits[1].name], [n.output[0] for n in nodes],
                                 name=f"{stem}_split", axis=-1)
        merged_nodes[id(nodes[0])] = [gemm, split]
        dropped.update(id(n) for n in nodes)
        replaced.update(name for n in nodes for name in n.input[1:] if name)
        counts["groups"] += 1
        counts["gemms"] += len(nodes)
    if counts["groups"]:
        written = []
        for node in graph.nodes:  # each group in the place of its first node: its input exists there, its readers follow
            written.extend(merged_nodes.get(id(node), []))
            if id(node) not in dropped:
                written.append(node)
        del model.graph.node[:]
        model.graph.node.extend(written)
        drop_unread_initializers(model, replaced)
    return counts


def _sibling_key(graph: GraphIndex, node):
    """(input, transB, has C, weight dtype, output width) for an eligible ``Gemm`` (module docstring), else None."""
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    if graph.attr(node, "transA", 0) or graph.attr(node, "alpha", 1.0) != 1.0:
        return None
    weight = graph.inits.get(node.input[1])
    if weight is None or len(weight.dims) != 2:
        return None
    trans_b = int(graph.attr(node, "transB", 0))
    width = int(weight.dims[0] if trans_b else weight.dims[1])
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if has_bias:
        bias = graph.inits.get(node.input[2])
        if bias is None or list(bias.dims) != [width] or graph.attr(node, "beta", 1.0) != 1.0:
            return None
    return node.input[0], trans_b, has_bias, weight.data_type, width
