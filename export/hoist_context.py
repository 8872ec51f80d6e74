"""The UNet's work that depends only on the request's text, moved out of the denoising step into a graph of its own.

Every denoising step runs the whole UNet graph, and part of that graph reads nothing but the text conditioning
(``encoder_hidden_states``, ``encoder_hidden_states_1`` and the T5 mask), which is the same at every step of a
request: in the fused full-size UNet the 32 cross-attentions' K/V projections and the mask's conversion to an
attention bias. ``split_context`` cuts the graph in two:

- the **context graph** (``unet_context.onnx``): the nodes whose inputs come only from those graph inputs (through
  data or through ``Shape``), constants and weights; its outputs are the tensors the rest of the UNet reads from it;
- the **step graph** (``unet.onnx``): everything else, with those tensors as graph inputs in place of the text
  inputs it no longer reads.

The runtime runs the context graph once per request and feeds its outputs to every step (``runtime/pipeline.py``).
Node for node the two graphs compute what the one did, so the result is the same (tested on ONNX Runtime's CPU
provider, tests/test_hoist_context.py).

Before the cut, ``unpack_cross_kv`` gives each fused cross-attention its K and V as two tensors instead of one packed
[B, L, N, 2, H] tensor: ONNX Runtime's MultiHeadAttention unpacks a packed K/V with a kernel of its own at every run
(``AddBiasUnpack``), and reads separate [B, L, N·H] K and V as they are. Both projections are then in the context
graph, computed once per request.
"""

from __future__ import annotations

import copy

from .graph_index import GraphIndex, drop_unread_initializers

KV_PACKED_RANK = 5  # MultiHeadAttention's packed K/V: [batch, kv_len, heads, 2, head_size]


class HoistError(RuntimeError):
    pass


def unpack_cross_kv(model) -> int:
    """Each ``MultiHeadAttention`` fed packed K/V from ``Reshape(MatMul(x, W), [0, 0, N, 2, H])`` (and no bias)
    gets ``MatMul(x, W_k)`` and ``MatMul(x, W_v)``, each [B, L, N·H], as its key and value inputs. ``model``: an
    ``onnx.ModelProto``, changed in place; returns the number of attentions changed. W's columns are laid out
    (head, K or V, channel), so W_k and W_v are its columns n·2H + h and n·2H + H + h. The packed MatMul and its
    Reshape are dropped where nothing else reads them."""
    import numpy as np
    from onnx import helper, numpy_helper

    index = GraphIndex(model)
    changed, dropped, replaced, new_inits = 0, set(), {}, []
    for node in index.nodes:
        if node.op_type != "MultiHeadAttention" or len(node.input) < 2 or not node.input[1]:
            continue
        if len(node.input) > 2 and node.input[2] or len(node.input) > 3 and node.input[3]:
            continue  # separate value or a bias: not the packed form
        reshape = index.producer.get(node.input[1])
        if reshape is None or reshape.op_type != "Reshape" or not index.only_reader(node.input[1], node):
            continue
        shape = index.constant(reshape.input[1])
        matmul = index.producer.get(reshape.input[0])
        if (shape is None or len(shape) != KV_PACKED_RANK or shape[3] != 2 or matmul is None
                or matmul.op_type != "MatMul" or not index.only_reader(reshape.input[0], reshape)):
            continue
        weight = index.initializer(matmul.input[1])
        heads, size = int(shape[2]), int(shape[4])
        if weight is None or weight.ndim != 2 or weight.shape[1] != heads * 2 * size:
            continue
        per_head = weight.reshape(weight.shape[0], heads, 2, size)
        projections = []
        for j, which in enumerate(("key", "value")):
            w = np.ascontiguousarray(per_head[:, :, j, :].reshape(weight.shape[0], heads * size))
            w_name, out = f"{node.name}_{which}_weight", f"{node.name}_{which}"
            new_inits.append(numpy_helper.from_array(w, w_name))
            projections.append(helper.make_node("MatMul", [matmul.input[0], w_name], [out],
                                                name=f"{node.name}_{which}_MatMul"))
        inputs = list(node.input) + [""] * (3 - len(node.input))
        inputs[1:3] = [p.output[0] for p in projections]
        del node.input[:]
        node.input.extend(inputs)
        replaced[id(matmul)] = projections  # in the packed MatMul's place: the graph stays topologically sorted
        dropped.add(id(reshape))
        changed += 1
    if changed:
        nodes = [new for n in model.graph.node if id(n) not in dropped for new in replaced.get(id(n), [n])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(new_inits)
        drop_unread_initializers(model)
    return changed


def split_context(model, context_inputs) -> tuple:
    """(step model, context model, the context graph's output names) of ``model`` (an ``onnx.ModelProto``, not
    changed), cut as the module docstring says. ``context_inputs``: the graph inputs that stay the same across the
    denoising steps. Raises HoistError when none of them is read, or nothing depends on them alone."""
    from onnx import TypeProto, helper

    graph = model.graph
    names = [i.name for i in graph.input]
    missing = sorted(set(context_inputs) - set(names))
    if missing:
        raise HoistError(f"context inputs {missing} are not inputs of the graph (it has {names})")
    context_set = set(context_inputs)
    nodes = _topological(list(graph.node))
    deps = _input_dependencies(graph.input, nodes)
    hoisted = []  # the nodes that read the context inputs and nothing else that changes
    for node in nodes:
        reads = _node_deps(node, deps)
        if reads and reads <= context_set:
            hoisted.append(node)
    if not hoisted:
        raise HoistError(f"no node of the graph depends on {sorted(context_set)} alone")
    hoisted_ids = {id(n) for n in hoisted}
    made = {o for n in hoisted for o in n.output}
    stay = [n for n in nodes if id(n) not in hoisted_ids]
    read_by_step = {x for n in stay for x in n.input if x} | {o.name for o in graph.output}
    frontier = [o for n in hoisted for o in n.output if o in read_by_step]

    constant_nodes = _constant_ancestors(hoisted, nodes, deps, made | context_set)
    inits = {i.name: i for i in graph.initializer}
    read_by_context = {x for n in constant_nodes + hoisted for x in n.input if x}

    context = helper.make_model(
        helper.make_graph(
            [copy.deepcopy(n) for n in _in_order(nodes, constant_nodes + hoisted)],
            f"{graph.name}_context",
            [copy.deepcopy(i) for i in graph.input if i.name in context_set and i.name in read_by_context],
            [helper.make_value_info(name, TypeProto()) for name in frontier],  # typed by _output_types
            [copy.deepcopy(inits[x]) for x in sorted(read_by_context & set(inits))]),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    shaped = _output_types(context)
    del context.graph.output[:]
    context.graph.output.extend(shaped[name] for name in frontier)

    step = copy.deepcopy(model)
    del step.graph.node[:]
    step.graph.node.extend(copy.deepcopy(n) for n in stay)
    kept_inputs = [i for i in graph.input if i.name not in context_set or i.name in read_by_step]
    del step.graph.input[:]
    step.graph.input.extend(copy.deepcopy(i) for i in kept_inputs)
    step.graph.input.extend(copy.deepcopy(shaped[name]) for name in frontier)
    drop_unread_initializers(step)
    del step.graph.value_info[:]
    return step, context, frontier


def _input_dependencies(inputs, nodes: list) -> dict[str, frozenset]:
    """tensor name → the graph ``inputs`` it depends on, through data or through its shape (initializers and
    constants: none). ``nodes``: the graph's, topologically sorted."""
    deps = {i.name: frozenset([i.name]) for i in inputs}
    for node in nodes:
        d = _node_deps(node, deps)
        for out in node.output:
            deps[out] = d
    return deps


def _node_deps(node, deps: dict) -> frozenset:
    return frozenset().union(*(deps.get(x, frozenset()) for x in node.input if x))


def _constant_ancestors(hoisted: list, nodes: list, deps: dict, available: set) -> list:
    """The input-free nodes (``Constant`` and arithmetic on constants) whose outputs the hoisted nodes read: the
    context graph needs its own copy of them."""
    producer = {o: n for n in nodes for o in n.output}
    needed, stack = {}, [x for n in hoisted for x in n.input if x and x not in available]
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in needed:
            continue  # an initializer, or seen
        if deps.get(name):
            raise HoistError(f"tensor {name!r} read by the context graph depends on {sorted(deps[name])}")
        needed[id(node)] = node
        stack.extend(x for x in node.input if x)
    return [n for n in nodes if id(n) in needed]


def _output_types(context) -> dict:
    """The context graph's outputs as ValueInfos with element type and shape (symbolic where the inputs' dims are),
    from ONNX's shape inference over it (its nodes are standard ops: the UNet's fused kernels read its outputs)."""
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(context, strict_mode=True)
    except Exception as err:  # onnx raises its own error types
        raise HoistError(f"shape inference failed on the context graph: {err}") from err
    out = {}
    for info in inferred.graph.output:
        tensor = info.type.tensor_type
        if not tensor.elem_type or not tensor.HasField("shape"):
            raise HoistError(f"no type and shape inferred for the context graph's output {info.name!r}")
        out[info.name] = info
    return out


def _in_order(nodes: list, chosen: list) -> list:
    ids = {id(n) for n in chosen}
    return [n for n in nodes if id(n) in ids]


def _topological(nodes: list) -> list:
    """``nodes`` in an order where each node follows the writers of its inputs (stable otherwise)."""
    written = {o for n in nodes for o in n.output}
    ready = set()
    out, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(not x or x not in written or x in ready for x in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise HoistError(f"the graph has a cycle through {[n.name for n in rest[:3]]}")
        pending = rest
    return out
