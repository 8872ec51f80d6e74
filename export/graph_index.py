"""Who writes and who reads each tensor of an ONNX graph: the index the export's rewrite passes share
(bias_split_gelu.py, fold_bias.py, self_attention.py)."""

from __future__ import annotations


class GraphIndex:
    """``model``'s nodes (one wrapper each, taken once: ``id(node)`` identifies a node for the whole pass), its
    initializers by name, the node writing each tensor, the nodes reading it, and the graph's output names."""

    def __init__(self, model):
        self.model = model
        self.nodes = list(model.graph.node)
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.readers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in model.graph.output}

    def only_reader(self, name: str, node) -> bool:
        """``node`` is the one reader of tensor ``name``, which is not a graph output."""
        return name not in self.outputs and [id(n) for n in self.readers.get(name, [])] == [id(node)]

    @staticmethod
    def attr(node, name: str, default):
        """Attribute ``name`` of ``node`` (ONNX's own reading of it), or ``default`` where the node has none."""
        from onnx.helper import get_attribute_value

        return next((get_attribute_value(a) for a in node.attribute if a.name == name), default)

    def initializer(self, name: str):
        """Initializer ``name`` as a numpy array, or None."""
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def constant(self, name: str):
        """Tensor ``name`` as a numpy array if an initializer or a ``Constant`` node's ``value`` holds it, else None."""
        from onnx import numpy_helper

        if name in self.inits:
            return self.initializer(name)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" else None
        return None


def drop_unread_initializers(model, names=None) -> None:
    """Remove from ``model`` (an ``onnx.ModelProto``) the initializers that no node reads and no graph output names —
    of ``names`` only, where given."""
    read = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in read or (names is not None and i.name not in names)]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
