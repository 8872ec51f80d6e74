"""GEGLU's bias, split and GELU as one ``BiasSplitGelu`` node, where ONNX Runtime's CUDA kernel takes the width.

diffusers' GEGLU is ``h, gate = proj(x).chunk(2, -1); h * gelu(gate)``. Exported and fused, the UNet runs it as
four kernels after the projection's MatMul: the bias ``Add``, two ``Slice``s, ``Gelu`` and ``Mul``. ONNX Runtime's
``com.microsoft.BiasSplitGelu(x, bias)`` does all of it in one: ``(x + bias)[..., :H] * gelu((x + bias)[..., H:])``
with the exact (erf) GELU, as diffusers. Its CUDA kernel accepts only a few widths 2H (``SUPPORTED_WIDTHS``; Stable
Diffusion's), so ONNX Runtime's own fusion (``enable_bias_splitgelu``) fails at run time on AudioLDM 2's other widths
(shared/reference/ort-cuda-facts.md §3) and stays off. This pass fuses the GEGLUs whose width the kernel takes — in
the full-size UNet the 640-channel blocks' (2H = 5120) — and, with ``pad=True``, the others too, widened with zeros
to the kernel's next width, at most twice their own (2048 → 2560 in the 256-channel blocks, 3072 → 5120 in the
384-channel ones):

    proj weight [C, 2H] → [C, 2H']: columns [h | 0 | gate | 0], each half H' = H + (H' − H) zeros; bias likewise
    BiasSplitGelu → [.., H']: h·gelu(gate) in the first H, 0·gelu(0) = 0 in the rest
    the next MatMul's weight [H, C'] → [H', C']: its rows, then H' − H rows of zeros

so the output is the same sum (only the GEMMs' summation order may differ). It is done only where the projection
and the MatMul after the product read weights nobody else reads.
"""

from __future__ import annotations

SUPPORTED_WIDTHS = (2560, 5120, 10240)  # 2H that ONNX Runtime's CUDA BiasSplitGelu accepts (bias_split_gelu.cc)
MAX_WIDENING = 2  # a GEGLU is widened at most to twice its width (more zeros than weights: more work than it saves)
INT64_MAX = 2**63 - 1


def fuse_bias_split_gelu(model, widths=SUPPORTED_WIDTHS, pad: bool = False) -> dict[str, int]:
    """Replace each GEGLU tail Add(x, bias) → Slice[:H], Slice[H:] → Gelu → Mul whose 2H is in ``widths`` by one
    ``BiasSplitGelu(x, bias)`` node in place (``model``: an ``onnx.ModelProto``; x [B, S, 2H] the projection's
    MatMul output, bias [2H] an initializer, the output [B, S, H]). With ``pad``, a tail of another width is
    widened with zeros to the next width in ``widths`` (the module's docstring; ``_target_width``), where the
    projection is a MatMul and the product's one reader is a MatMul, each with a weight of its own. Returns how many
    tails were fused at their own width ("fused") and widened ("padded").
    A tail is fused only if none of its intermediate tensors is read elsewhere or is a graph output."""
    import onnx

    from .graph_index import GraphIndex

    index = GraphIndex(model)
    graph, nodes, inits, producer, readers = model.graph, index.nodes, index.inits, index.producer, index.readers
    outputs, const, only_reader = index.outputs, index.constant, index.only_reader

    def last_axis_range(sl, rank_hint):
        """(start, end) of a Slice over the last axis only, step 1; None otherwise."""
        if sl.op_type != "Slice" or len(sl.input) < 3:
            return None
        starts, ends = const(sl.input[1]), const(sl.input[2])
        axes = const(sl.input[3]) if len(sl.input) > 3 and sl.input[3] else None
        steps = const(sl.input[4]) if len(sl.input) > 4 and sl.input[4] else None
        if starts is None or ends is None or starts.size != 1 or ends.size != 1:
            return None
        if steps is not None and (steps.size != 1 or int(steps.reshape(-1)[0]) != 1):
            return None
        axis = int(axes.reshape(-1)[0]) if axes is not None else 0
        if axis not in (-1, rank_hint - 1):
            return None
        return int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])

    fused, padded, drop = 0, 0, set()
    new_nodes = {}
    for gelu in nodes:
        if gelu.op_type != "Gelu" or gelu.domain not in ("", "com.microsoft", "ai.onnx"):
            continue
        if any(a.name == "approximate" and a.s not in (b"", b"none") for a in gelu.attribute):
            continue  # the kernel computes the erf GELU only
        right = producer.get(gelu.input[0])
        muls = readers.get(gelu.output[0], [])
        if right is None or len(muls) != 1 or muls[0].op_type != "Mul":
            continue
        mul = muls[0]
        left_name = mul.input[0] if mul.input[1] == gelu.output[0] else mul.input[1]
        left = producer.get(left_name)
        if left is None or right.input[0] != left.input[0]:
            continue
        add = producer.get(left.input[0])
        if add is None or add.op_type != "Add":
            continue
        bias_names = [n for n in add.input if n in inits]
        if len(bias_names) != 1:
            continue
        bias = index.initializer(bias_names[0])
        width = int(bias.size)
        target = _target_width(width, widths, pad)
        if bias.ndim != 1 or target is None:
            continue
        half = width // 2
        x = add.input[1] if add.input[0] == bias_names[0] else add.input[0]
        if last_axis_range(left, 3) not in ((0, half),):
            continue
        r = last_axis_range(right, 3)
        if r is None or r[0] != half or r[1] not in (width, INT64_MAX, 2**31 - 1):
            continue
        if not (only_reader(gelu.output[0], mul) and only_reader(right.output[0], gelu)
                and only_reader(left.output[0], mul)
                and sorted(id(n) for n in readers.get(add.output[0], [])) == sorted((id(left), id(right)))
                and add.output[0] not in outputs):
            continue
        if target != width and not _widen(index, add, bias_names[0], mul, target):
            continue
        padded += target != width
        node = onnx.helper.make_node("BiasSplitGelu", [x, bias_names[0]], [mul.output[0]],
                                     name=f"BiasSplitGelu_{fused}_{mul.name}", domain="com.microsoft")
        new_nodes[id(mul)] = node
        drop.update({id(add), id(left), id(right), id(gelu)})
        fused += 1
    if fused:
        kept = []
        for node in nodes:
            if id(node) in drop:
                continue
            kept.append(new_nodes.get(id(node), node))
        del graph.node[:]
        graph.node.extend(kept)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return {"fused": fused - padded, "padded": padded}


def _target_width(width: int, widths, pad: bool) -> int | None:
    """The width 2H' the kernel runs a GEGLU of 2H = ``width`` at: its own if ``widths`` holds it; with ``pad`` the
    next one it holds, up to ``MAX_WIDENING`` times its own; None otherwise."""
    if width in widths:
        return width
    wider = [w for w in widths if width < w <= MAX_WIDENING * width]
    return min(wider) if pad and wider else None


def _widen(index, add, bias_name: str, mul, target: int) -> bool:
    """Widen one GEGLU from 2H to ``target`` = 2H' in place, as the module's docstring shows: the projection
    MatMul's weight [C, 2H] and the bias [2H] (read by ``add``) to 2H' columns, and the weight [H, C'] of the
    MatMul reading the product (``mul``'s output) to H' rows. Returns False, changing nothing, unless both MatMuls
    read a weight initializer of those shapes that no other node reads."""
    import numpy as np
    from onnx import numpy_helper

    x = add.input[1] if add.input[0] == bias_name else add.input[0]
    proj = index.producer.get(x)
    after = index.readers.get(mul.output[0], [])
    if proj is None or proj.op_type != "MatMul" or not index.only_reader(x, add) or len(after) != 1:
        return False
    out = after[0]
    if out.op_type != "MatMul" or out.input[0] != mul.output[0] or mul.output[0] in index.outputs:
        return False
    w_in, w_out, bias = (index.initializer(n) for n in (proj.input[1], out.input[1], bias_name))
    width, half, new_half = bias.size, bias.size // 2, target // 2
    if (w_in is None or w_out is None or w_in.ndim != 2 or w_in.shape[1] != width or w_out.ndim != 2
            or w_out.shape[0] != half
            or not all(index.only_reader(n, node) for n, node in ((proj.input[1], proj), (out.input[1], out),
                                                                 (bias_name, add)))):
        return False

    def widened_columns(a):  # [..., 2H] → [..., 2H']: [h | 0 | gate | 0]
        wide = np.zeros(a.shape[:-1] + (target,), a.dtype)
        wide[..., :half], wide[..., new_half:new_half + half] = a[..., :half], a[..., half:]
        return wide

    w_out_wide = np.zeros((new_half, w_out.shape[1]), w_out.dtype)
    w_out_wide[:half] = w_out
    for name, value in ((proj.input[1], widened_columns(w_in)), (bias_name, widened_columns(bias)),
                        (out.input[1], w_out_wide)):
        index.inits[name].CopyFrom(numpy_helper.from_array(value, name))
    stale = {x, mul.output[0]}  # their recorded shapes had the old width
    kept = [v for v in index.model.graph.value_info if v.name not in stale]
    del index.model.graph.value_info[:]
    index.model.graph.value_info.extend(kept)
    return True
