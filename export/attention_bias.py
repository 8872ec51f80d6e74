"""Keep a key-padding mask through ONNX Runtime's attention fusion by handing it to the fused node.

ORT's UNet attention fusion matches ``Softmax(Add(Mul(MatMul(q, kᵀ), scale), bias))`` and drops ``bias``
(shared/reference/ort-cuda-facts.md §2): for AudioLDM 2 that bias carries the T5 stream's padding mask, which
classifier-free guidance needs (the negative prompt's T5 tokens are padded to the prompt's length). So:

1. before fusion, ``masked_attention_outputs`` finds the attentions whose softmax bias is computed from the
   mask input, and remembers the tensor each one's fused node will write;
2. after fusion, ``attach_mask_bias`` feeds those ``MultiHeadAttention`` nodes an ``attention_bias`` of shape
   (batch, 1, query_len, key_len) built from the mask input with diffusers' formula ``(1 - mask) * -10000``
   (AudioLDM2UNet2DConditionModel.forward), and restores the graph input if the fusion pruned it.

A masked attention the fusion left alone keeps its own mask (logged: it runs unfused, slower). One that was
fused into a node of another kind, or removed without a fused node, is an error, never a silent unmasked graph.
"""

from __future__ import annotations

import logging

log = logging.getLogger("audioldm2_trt.export")

MASK_FILL = -10000.0  # diffusers: (1 - mask) * -10000.0 for the UNet's encoder attention masks

# Nodes where the walk back from a softmax bias stops: past them lies the hidden-state data path, not the mask.
_DATA_PATH = {"Shape", "MatMul", "Softmax", "Gemm"}


class AttentionMaskError(RuntimeError):
    pass


def masked_attention_outputs(model, mask_input: str) -> list[tuple[str, set[str]]]:
    """For each softmax whose additive bias is computed from graph input ``mask_input``: (the softmax's output,
    the names of the tensors on its output chain: [Cast] → MatMul → Reshape → Transpose → Reshape), one of which
    the fused attention node will produce. ``model``: onnx.ModelProto before fusion."""
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def reaches_mask(tensor: str) -> bool:
        stack, seen = [tensor], set()
        while stack:
            name = stack.pop()
            if name == mask_input:
                return True
            node = producers.get(name)
            if node is None or node.name in seen or node.op_type in _DATA_PATH:
                continue
            seen.add(node.name)
            stack.extend(i for i in node.input if i)
        return False

    found = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        add = producers.get(node.input[0])
        if add is None or add.op_type != "Add" or not any(reaches_mask(i) for i in add.input):
            continue
        chain, tensor = set(), node.output[0]
        for _ in range(6):  # follow the data consumer (shape reads branch off) down to the output reshape
            data = [c for c in consumers.get(tensor, []) if c.op_type != "Shape"]
            if len(data) != 1:
                break
            tensor = data[0].output[0]
            chain.add(tensor)
        found.append((node.output[0], chain))
    return found


def attach_mask_bias(model, mask_input, chains: list[tuple[str, set[str]]]) -> int:
    """Give every fused attention node that ends one of ``chains`` an attention_bias from ``mask_input``.

    ``model``: onnx.ModelProto after fusion; ``mask_input``: the original graph input (onnx.ValueInfoProto,
    int64 (batch, key_len), 1 = keep). Returns the number of nodes given the bias."""
    from onnx import TensorProto, helper

    graph = model.graph
    produced = {out for n in graph.node for out in n.output}
    targets, unfused = [], 0
    for softmax_output, chain in chains:
        nodes = [n for n in graph.node if n.output and n.output[0] in chain
                 and n.op_type in ("MultiHeadAttention", "Attention")]
        if not nodes and softmax_output in produced:  # left unfused: its softmax still adds the mask
            unfused += 1
            continue
        if len(nodes) != 1 or nodes[0].op_type != "MultiHeadAttention":
            kinds = [n.op_type for n in nodes]
            raise AttentionMaskError(f"a masked attention (mask {mask_input.name!r}) fused into {kinds or 'nothing'}, "
                                     "expected one MultiHeadAttention node or the unfused attention")
        targets.append(nodes[0])
    if unfused:
        log.warning("%d of %d attentions masked by %s were left unfused by ONNX Runtime's fusion (they keep their "
                    "mask and run slower)", unfused, len(chains), mask_input.name)
    if not targets:
        return 0

    name = mask_input.name
    if name not in [i.name for i in graph.input]:
        graph.input.append(mask_input)  # pruned by the fusion with the nodes that read it
    p = f"{name}_bias"
    graph.initializer.extend([
        helper.make_tensor(f"{p}_one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor(f"{p}_fill", TensorProto.FLOAT, [], [MASK_FILL]),
        helper.make_tensor(f"{p}_axes", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor(f"{p}_ones", TensorProto.INT64, [2], [1, 1]),
        helper.make_tensor(f"{p}_one_dim", TensorProto.INT64, [1], [1]),
        helper.make_tensor(f"{p}_seq_axis", TensorProto.INT64, [1], [1]),
    ])
    new_nodes = [
        helper.make_node("Cast", [name], [f"{p}_float"], to=TensorProto.FLOAT, name=f"{p}_Cast"),
        helper.make_node("Sub", [f"{p}_one", f"{p}_float"], [f"{p}_inverted"], name=f"{p}_Sub"),
        helper.make_node("Mul", [f"{p}_inverted", f"{p}_fill"], [f"{p}_2d"], name=f"{p}_Mul"),
        helper.make_node("Unsqueeze", [f"{p}_2d", f"{p}_axes"], [f"{p}_4d"], name=f"{p}_Unsqueeze"),  # (B,1,1,L)
    ]
    for k, node in enumerate(targets):  # (B,1,1,L) → (B,1,S,L): the kernels take no broadcast over queries
        q = f"{p}_{k}"
        new_nodes += [
            helper.make_node("Shape", [node.input[0]], [f"{q}_qshape"], name=f"{q}_Shape"),
            helper.make_node("Gather", [f"{q}_qshape", f"{p}_seq_axis"], [f"{q}_qlen"], axis=0, name=f"{q}_Gather"),
            helper.make_node("Concat", [f"{p}_ones", f"{q}_qlen", f"{p}_one_dim"], [f"{q}_shape"], axis=0,
                             name=f"{q}_Concat"),
            helper.make_node("Expand", [f"{p}_4d", f"{q}_shape"], [q], name=f"{q}_Expand"),
        ]
        inputs = list(node.input) + [""] * (6 - len(node.input))
        if inputs[4] or inputs[5]:
            raise AttentionMaskError(f"{node.name} already has a mask or attention bias")
        inputs[5] = q  # MultiHeadAttention: query, key, value, bias, key_padding_mask, attention_bias
        del node.input[:]
        node.input.extend(inputs)
    graph.node.extend(new_nodes)  # the caller sorts topologically
    return len(targets)
