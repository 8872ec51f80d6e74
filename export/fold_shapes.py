"""Fold shape arithmetic on static dimensions into constants.

The TorchScript exporter writes ``x.shape[-1] ** 0.5`` and friends as ``Shape → Gather → Cast → Sqrt``
chains even where the dimension is a fixed model size (a head dimension, a hidden size). ONNX Runtime's
CUDA provider runs ``Shape`` and the arithmetic after it on the CPU, so such a chain feeding a GPU op
(the attention scale of the VAE's mid-block, GPT-2's ``/ sqrt(head_dim)``) puts a host→device copy in the
graph — and a graph with one cannot be captured as a CUDA graph (seen on the H100:
docs/results/ort-placement-2026-11-26.log). ONNX Runtime's own constant folding only folds ``Shape`` when
the *whole* input shape is static; here the batch and sequence axes are dynamic while the gathered axis
is not.

``fold_static_shapes`` infers shapes (ONNX shape inference, weights left out), evaluates every value
that follows from static dimensions and constants alone, and replaces it by an initializer. Values that
depend on a dynamic axis (a sequence length) are left alone.
"""

from __future__ import annotations

import numpy as np

# Cheap ops over small tensors that may be evaluated once at export.
_FOLDABLE = {"Cast", "Div", "Mul", "Add", "Sub", "Sqrt", "Pow", "Unsqueeze", "Squeeze", "Concat", "Reshape",
             "Gather", "Slice", "Floor", "Ceil", "Neg", "Reciprocal", "Equal", "Less", "Greater", "Not",
             "Where", "Range", "Identity", "Max", "Min", "Mod", "Abs", "ReduceProd", "ConstantOfShape",
             "Expand", "Sign",
             # CLAP audio's shifted-window mask: padding amounts transposed from a constant, then index ranges
             # compared against them (20 host→device copies on the H100, which refused its CUDA graph)
             "Transpose", "GreaterOrEqual", "LessOrEqual", "And", "Or"}
# Ops that turn a shape into device data (ONNX Runtime runs them on the GPU, reading the shape on the host).
_DATA_FROM_SHAPE = {"Constant", "ConstantOfShape", "Range", "Expand", "Tile"}
# Inputs that ONNX Runtime's CUDA kernels take on the host (shapes, indices of slicing, axes).
_HOST_INPUTS = {"Reshape": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "ConstantOfShape": "all", "Tile": (1,),
                "Unsqueeze": (1,), "Squeeze": (1,), "Range": "all", "Resize": (1, 2, 3), "Pad": (1, 2),
                "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "Split": (1,), "TopK": (1,),
                "Upsample": (1,), "OneHot": (1,)}
_INT_TYPES = (7, 6)  # onnx.TensorProto.INT64, INT32
_MAX_ELEMENTS = 4096  # a folded value larger than this is left to run (it is data, not a shape)
_SMALL_INITIALIZER = 64  # initializers up to this many elements take part in folding


def fold_static_shapes(model, max_passes: int = 4) -> int:
    """Fold in place; returns the number of node outputs replaced by constants.

    model: an ``onnx.ModelProto`` with standard ops (before any fusion), weights loaded or external.
    Repeats while a pass folds something: a folded ``Reshape`` target lets shape inference see static
    dimensions after it (e.g. the head dimension behind diffusers' ``head_to_batch_dim``).
    """
    total = 0
    for _ in range(max_passes):
        count = _fold_once(model)
        total += count
        if not count:
            break
    return total


def _fold_once(model) -> int:
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    dims = _inferred_dims(model)
    known: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        if _elements(init.dims) <= _SMALL_INITIALIZER and not _is_external(init):
            known[init.name] = numpy_helper.to_array(init)
    partial: dict[str, list] = {}  # Shape outputs with at least one dynamic dimension
    folded: list[str] = []
    graph_outputs = {o.name for o in graph.output}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)

    for node in graph.node:
        if any(o in graph_outputs for o in node.output):
            continue
        if node.op_type == "Constant":
            value = _constant_value(node)
            if value is not None:
                known[node.output[0]] = value
            continue
        if node.op_type == "Shape":
            shape = dims.get(node.input[0])
            if shape is None:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            shape = shape[attrs.get("start", 0): attrs.get("end", len(shape))]
            if all(d is not None for d in shape):
                known[node.output[0]] = np.array(shape, dtype=np.int64)
                folded.append(node.output[0])
            else:
                partial[node.output[0]] = shape
            continue
        if node.input and node.input[0] in partial and node.op_type in ("Gather", "Slice"):
            value = _index_partial(node, partial[node.input[0]], known)
            if value is not None:
                known[node.output[0]] = value
                folded.append(node.output[0])
            continue
        inputs = [i for i in node.input if i]
        if node.op_type in _FOLDABLE and inputs and all(i in known for i in inputs):
            values = _evaluate(node, [known[i] if i else None for i in node.input], opset)
            if values is not None and all(v.size <= _MAX_ELEMENTS for v in values):
                for name, value in zip(node.output, values):
                    known[name] = value
                    folded.append(name)

    if not folded:
        return 0
    folded_set = set(folded)
    keep = [n for n in graph.node if n.op_type == "Constant" or not all(o in folded_set for o in n.output)]
    needed = {i for n in keep for i in n.input} | graph_outputs
    existing = {i.name for i in graph.initializer}
    new_inits = [numpy_helper.from_array(known[name], name) for name in folded
                 if name in needed and name not in existing]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    stale = [v for v in graph.value_info if v.name in folded_set]
    for v in stale:
        graph.value_info.remove(v)
    _drop_dead_nodes(graph)
    return len(new_inits)


def shape_values_into_data(model) -> list[tuple[str, str]]:
    """(producer, consumer) node names where a value computed from ``Shape`` on the host feeds an input
    that ONNX Runtime's CUDA kernels read on the device — the edges it turns into host→device copies,
    which forbid CUDA graph capture. A model of its placement (shape arithmetic on the CPU; the inputs
    in ``_HOST_INPUTS`` read on the host); the diagnosis on a real GPU is ``scripts/ort_placement.py``."""
    graph = model.graph
    small = {i.name for i in graph.initializer if _elements(i.dims) <= _SMALL_INITIALIZER
             and i.data_type in _INT_TYPES}
    small |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    derived: set[str] = set()
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "Shape":
            derived.update(node.output)
        elif node.op_type not in _DATA_FROM_SHAPE:
            ins = [i for i in node.input if i]
            if any(i in derived for i in ins) and all(i in derived or i in small for i in ins):
                derived.update(node.output)
    edges = []
    for node in graph.node:
        if all(o in derived for o in node.output):
            continue
        host = _HOST_INPUTS.get(node.op_type, ())
        for k, name in enumerate(node.input):
            if name in derived and host != "all" and k not in host:
                edges.append((producers[name].name, node.name))
    return edges


def _inferred_dims(model) -> dict[str, list]:
    """Tensor name → list of int (static) / None (dynamic), from ONNX shape inference run on a copy of
    the graph whose large weights are declared as inputs (no 2 GB protobuf limit, no stale value_info)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_without_weights(model), strict_mode=False, data_prop=True)
    dims = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            dims[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in model.graph.initializer:
        dims[init.name] = list(init.dims)
    return dims


def _without_weights(model):
    import onnx

    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if _elements(init.dims) <= _SMALL_INITIALIZER and not _is_external(init):
            g.initializer.append(init)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def _index_partial(node, shape: list, known: dict) -> np.ndarray | None:
    """Gather / Slice over a partly static shape vector: the value if every picked dimension is static."""
    import onnx

    vec = np.array([-1 if d is None else d for d in shape], dtype=np.int64)
    static = np.array([d is not None for d in shape])
    if node.op_type == "Gather":
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if axis != 0 or node.input[1] not in known:
            return None
        idx = known[node.input[1]]
        return vec[idx] if static[idx].all() else None
    args = [known.get(i) if i else None for i in node.input[1:]]
    if any(a is None for a in args[:2]) or any(i and i not in known for i in node.input[1:]):
        return None
    starts, ends = args[0], args[1]
    axes = args[2] if len(args) > 2 and args[2] is not None else np.array([0])
    steps = args[3] if len(args) > 3 and args[3] is not None else np.array([1])
    if list(axes) != [0] or len(starts) != 1:
        return None
    sl = slice(int(starts[0]), int(ends[0]), int(steps[0]))
    return vec[sl] if static[sl].all() else None


def _evaluate(node, values: list, opset: int) -> list[np.ndarray] | None:
    import onnx
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if v is not None else "" for i, v in enumerate(values)]
    inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in zip(names, values) if n]
    outputs = [onnx.helper.make_empty_tensor_value_info(f"out{i}") for i in range(len(node.output))]
    single = onnx.helper.make_node(node.op_type, names, [o.name for o in outputs], domain=node.domain)
    single.attribute.extend(node.attribute)
    graph = onnx.helper.make_graph([single], "fold", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        result = ReferenceEvaluator(model).run(None, {n: v for n, v in zip(names, values) if n})
    except Exception:  # an op the reference cannot evaluate stays in the graph
        return None
    return [np.asarray(r) for r in result]


def _constant_value(node) -> np.ndarray | None:
    import onnx
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_int", "value_ints"):
            return np.array(onnx.helper.get_attribute_value(a), dtype=np.int64)
        if a.name in ("value_float", "value_floats"):
            return np.array(onnx.helper.get_attribute_value(a), dtype=np.float32)
    return None


def _drop_dead_nodes(graph) -> None:
    """Remove nodes whose outputs nobody reads (the Shape/Constant nodes left behind by folding)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        live = [n for n in graph.node if any(o in used for o in n.output)]
        if len(live) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(live)


def _elements(dims) -> int:
    return int(np.prod(dims)) if len(dims) else 1


def _is_external(init) -> bool:
    import onnx

    return init.data_location == onnx.TensorProto.EXTERNAL
