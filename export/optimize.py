"""fp32 ONNX → fp16 ONNX with ONNX Runtime's own tools: fuse first (in fp32), convert after.

Each component's ``Fp16Recipe`` (components.py) says what to fuse and what stays fp32. Inputs and
outputs stay float32 (``keep_io_types``), so the runtime feeds every precision the same way.
Traps this avoids, each measured on the full-size model (shared/reference/ort-cuda-facts.md):
an fp16 export fed to the optimizer fails, so fusion runs on the fp32 graph; the converter would turn
the constants that feed ``Resize`` into fp16 and make an invalid model, so those nodes are blocked;
passing ``op_block_list`` replaces the converter's defaults, so they are added back.
"""

from __future__ import annotations

import copy
import logging
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from .attention_bias import attach_mask_bias, masked_attention_outputs
from .bias_split_gelu import fuse_bias_split_gelu
from .components import Fp16Recipe
from .fold_bias import fold_biases
from .hoist_context import split_context, unpack_cross_kv
from .conv_bias import conv_bias_as_add
from .self_attention import fuse_self_attention, gemm_bias_into_skip_layer_norm, qkv_bias_into_attention
from .sibling_gemms import merge_sibling_gemms

log = logging.getLogger("audioldm2_trt.export")


def to_fp16(path: Path, recipe: Fp16Recipe, save) -> dict:
    """Rewrite the fp32 model at ``path`` in place as fp16; ``save(model_proto, path)`` writes it.

    Returns a summary for the manifest: fused op counts and what was kept fp32. With ``recipe.hoist_context`` the
    text-only work is cut into ``<stem>_context.onnx`` beside it (``write_context``) and the summary's "context"
    describes it.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(path)))
    for i, node in enumerate(model.model.graph.node):  # the converter's node block list works by name
        node.name = node.name or f"{node.op_type}_{i}"
    fused, folded, geglus, merged = {}, {}, {}, {}
    if recipe.fusion:
        model, folded, geglus, merged = fuse(model, recipe)
        fused = {op: n for op, n in _op_counts(model.model).items()
                 if op in ("GroupNorm", "NhwcConv", "BiasGelu", "FastGelu", "LayerNormalization", "BiasSplitGelu",
                           "SkipLayerNormalization", "BiasAdd", "SkipGroupNorm", "MultiHeadAttention", "Attention",
                           "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")}
    conv_biases = conv_bias_as_add(model.model) if recipe.conv_bias_as_add else 0
    blocked_nodes = resize_parameter_nodes(model.model)
    if recipe.fp16_nodes:
        allowed = re.compile(recipe.fp16_nodes)
        chosen = [n.name for n in model.model.graph.node if allowed.search(n.name)]
        if not chosen:  # a renamed module would otherwise silently give an all-fp32 graph
            raise RuntimeError(f"no node name matches the fp16 allow-list {recipe.fp16_nodes!r}")
        blocked_nodes += [n.name for n in model.model.graph.node if not allowed.search(n.name)]
    op_block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(recipe.fp32_ops))
    model.convert_float_to_float16(keep_io_types=True, op_block_list=op_block, node_block_list=blocked_nodes,
                                   disable_shape_infer=True)
    _drop_duplicate_casts(model.model)
    model.topological_sort()  # keep_io_types appends its Cast nodes at the end (fuse declared the fused ops' domains)
    context = write_context(model.model, path, recipe.hoist_context, save) if recipe.hoist_context else None
    if context is None:
        save(model.model, path)
    return {"fused": fused, **({"folded_biases": folded} if folded else {}),
            **({"context": context} if context else {}),
            **({"merged_gemms": merged} if merged.get("groups") else {}),
            **({"padded_geglus": geglus["padded"]} if geglus.get("padded") else {}),
            **({"conv_biases_as_add": conv_biases} if conv_biases else {}),
            "fp32_ops": list(recipe.fp32_ops), "fp32_nodes": len(blocked_nodes),
            **({"fp16_nodes": recipe.fp16_nodes} if recipe.fp16_nodes else {})}


def fuse(model, recipe: Fp16Recipe):
    """Every fusion and rewrite of ``recipe`` on ``model`` (an ``onnxruntime.transformers`` ``OnnxModel`` of the fp32
    graph): ONNX Runtime's optimizer, then our own passes. Returns (the fused OnnxModel, the biases moved, the GEGLUs
    fused, the sibling GEMMs merged); the graph stays fp32 (``to_fp16`` converts it after)."""
    folded, geglus, merged = {}, {}, {}
    model = _fuse(model, recipe)
    if recipe.bias_split_gelu:
        geglus = fuse_bias_split_gelu(model.model, pad=recipe.pad_geglu)
        log.info("%s: GEGLU tails fused as BiasSplitGelu: %s", recipe.fusion, geglus)
    if recipe.fold_biases:
        folded = fold_biases(model.model, recipe.fold_biases)
        log.info("%s: biases folded into the node after them: %s", recipe.fusion, folded)
    if recipe.self_attention:
        attentions = fuse_self_attention(model.model, recipe.attention_bias_over_queries)
        folded = {**folded, "gemm_into_skip_layer_norm": gemm_bias_into_skip_layer_norm(model.model)}
        model.prune_graph(allow_remove_graph_inputs=False)
        if recipe.attention_qkv_bias:  # on the pruned graph: the replaced Reshapes no longer read the projections
            folded["qkv_bias_into_attention"] = qkv_bias_into_attention(model.model)
            model.prune_graph(allow_remove_graph_inputs=False)
        log.info("%s: %d attentions fused as MultiHeadAttention, biases moved: %s", recipe.fusion, attentions, folded)
    if recipe.merge_sibling_gemms:  # after fold_biases, which moves those GEMMs' biases into the SkipGroupNorm after them
        merged = merge_sibling_gemms(model.model)
        log.info("%s: sibling GEMMs merged: %s", recipe.fusion, merged)
    _import_domains(model.model)
    return model, folded, geglus, merged


def _import_domains(model) -> None:
    """Declare the opset of every domain ``model``'s nodes use (fused contrib ops — GroupNorm, NhwcConv,
    MultiHeadAttention … — live in com.microsoft)."""
    from onnx import helper

    domains = {node.domain for node in model.graph.node} - {"", "ai.onnx"}
    known = {o.domain for o in model.opset_import}
    for domain in sorted(domains - known):
        model.opset_import.append(helper.make_opsetid(domain, 1))


def write_context(model, path: Path, context_inputs, save) -> dict:
    """Cut ``model`` (an ``onnx.ModelProto``) into its step graph, saved at ``path``, and its context graph, saved as
    ``<stem>_context.onnx`` beside it (hoist_context.py: cross-attention K/V unpacked first). Returns the manifest's
    description: {"file", "inputs" (the context graph's), "outputs" (its, which the step graph reads), "step_inputs"
    (the step graph's inputs, in order), "unpacked_kv" (attentions whose K/V were unpacked)}."""
    unpacked = unpack_cross_kv(model)
    step, context, outputs = split_context(model, context_inputs)
    context_path = path.with_name(f"{path.stem}_context.onnx")
    save(context, context_path)
    save(step, path)
    log.info("%s: %d nodes run once per request in %s (%d outputs); %d cross-attention K/V unpacked", path.name,
             len(context.graph.node), context_path.name, len(outputs), unpacked)
    return {"file": context_path.name, "inputs": [i.name for i in context.graph.input], "outputs": outputs,
            "step_inputs": [i.name for i in step.graph.input], "unpacked_kv": unpacked}


def _fuse(model, recipe: Fp16Recipe):
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(recipe.fusion)
    for key, value in recipe.fusion_options:
        if not hasattr(options, key):
            raise AttributeError(f"FusionOptions has no {key!r}")  # catches option renames in new ORT versions
        setattr(options, key, value)
    graph_inputs = {i.name: copy.deepcopy(i) for i in model.model.graph.input}
    inputs_before = list(graph_inputs)
    chains = []
    if recipe.attention_mask_input:
        chains = masked_attention_outputs(model.model, recipe.attention_mask_input)
    with _group_norm_children_from_the_pass_map():
        fused = optimize_model(model.model, model_type=recipe.fusion, opt_level=0, optimization_options=options,
                               use_gpu=True)
    if chains:
        n = attach_mask_bias(fused.model, graph_inputs[recipe.attention_mask_input], chains)
        log.info("%s: %d fused attention nodes take %s as attention_bias", recipe.fusion, n,
                 recipe.attention_mask_input)
        order = {name: k for k, name in enumerate(inputs_before)}
        restored = sorted(fused.model.graph.input, key=lambda i: order.get(i.name, len(order)))
        del fused.model.graph.input[:]
        fused.model.graph.input.extend(restored)
        fused.topological_sort()
    inputs_after = [i.name for i in fused.model.graph.input]
    if inputs_after != inputs_before:  # e.g. a fusion that swallowed an attention mask
        raise RuntimeError(f"{recipe.fusion} fusion changed the graph inputs {inputs_before} → {inputs_after}")
    return fused


@contextmanager
def _group_norm_children_from_the_pass_map():
    """ONNX Runtime's GroupNorm fusion (``FusionGroupNorm.fuse``) looks for a Swish ``Mul`` among each candidate's
    descendants with ``find_first_child_by_type`` and no node map, so every node it visits rebuilds the map of the
    whole graph: 70 s of the full-size UNet's export on a 2-core machine (cProfile, 2026-11-28; without the profiler the
    UNet's export went 219 → 156 s, docs/benchmarks.md). Inside one fusion pass the graph
    does not change (a pass records the nodes to add and remove and applies them at its end), so the map that the pass
    hands to ``fuse`` is the one those calls would rebuild: here they are given it, and find the same node. Checked by
    the export writing byte-identical files with and without this (docs/benchmarks.md)."""
    from onnxruntime.transformers import optimizer

    # the optimizer imports its modules by their top-level names (its folder on sys.path), so the class that the UNet
    # and VAE fusions use is the one in onnx_model_unet's namespace, not onnxruntime.transformers.fusion_group_norm's
    FusionGroupNorm = sys.modules[optimizer.UnetOnnxModel.__module__].FusionGroupNorm
    original = FusionGroupNorm.fuse

    def fuse(self, node, input_name_to_nodes, output_name_to_node):
        model = self.model
        find = model.find_first_child_by_type

        def find_with_the_pass_map(start, child_type, node_map=None, recursive=True):
            return find(start, child_type, input_name_to_nodes if node_map is None else node_map, recursive)

        model.find_first_child_by_type = find_with_the_pass_map  # this instance only, for this call
        try:
            return original(self, node, input_name_to_nodes, output_name_to_node)
        finally:
            del model.find_first_child_by_type

    FusionGroupNorm.fuse = fuse
    try:
        yield
    finally:
        FusionGroupNorm.fuse = original


def resize_parameter_nodes(model) -> list[str]:
    """Names of the nodes that produce ``Resize``'s roi/scales/sizes: they must stay fp32/int64."""
    producers = {out: node for node in model.graph.node for out in node.output}
    blocked = []
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        for name in node.input[1:]:
            stack = [name]
            while stack:  # walk back through Constant/Cast/Concat chains to their source
                src = producers.get(stack.pop())
                if src is None or src.name in blocked:
                    continue
                if src.op_type in ("Constant", "Cast", "Concat", "Unsqueeze", "Mul", "Div", "Slice", "Shape", "Gather"):
                    blocked.append(src.name)
                    stack.extend(src.input)
    return blocked


def _op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _drop_duplicate_casts(model) -> None:
    """The converter adds one Cast per (tensor, blocked consumer); when two blocked nodes read the same fp16
    tensor it emits the same Cast twice (same name, same output), which ONNX Runtime rejects. Keep one."""
    seen = set()
    keep = []
    for node in model.graph.node:
        key = (node.op_type, tuple(node.input), tuple(node.output), node.name)
        if node.op_type == "Cast" and key in seen:
            continue
        seen.add(key)
        keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)
    names: dict[str, int] = {}
    for node in model.graph.node:  # any other clash: make names unique (outputs are already distinct)
        n = names.get(node.name, 0)
        names[node.name] = n + 1
        if n:
            node.name = f"{node.name}_{n}"
