"""What the small ONNX graphs shipped with the runtime (``runtime/graphs/``: the solver step, GPT-2's append) share:
their folder, constant nodes, how a graph becomes a checked model every supported onnxruntime reads, and writing it.
They hold no weights and do not depend on the model, so the runtime carries them instead of the artefacts."""

from __future__ import annotations

from pathlib import Path

OPSET = 17
GRAPHS = Path(__file__).resolve().parent.parent / "runtime" / "graphs"


def constant(name: str, value):
    """A Constant node named ``name`` holding ``value`` (a numpy array or scalar)."""
    import numpy as np
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def checked_model(graph):
    """``graph`` as a model of opset ``OPSET``, IR version 8 (readable by every onnxruntime the project supports,
    >= 1.17), checked in full."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="audioldm2_trt")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def write(model, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))
    print(f"wrote {path}")
