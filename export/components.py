"""The one table of exported components: wrapper, named inputs/outputs with symbolic dims, dtypes.

Dynamic axes, sample inputs, validation shapes and manifest entries are all derived from it.
A dim is either a model constant (resolved from the pipeline: ``clap_dim``, ``t5_dim`` …) or one of
the dynamic names in ``DYNAMIC_DIMS``, whose sizes come from a ``SampleShape``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from . import wrappers

DYNAMIC_DIMS = ("batch", "clap_seq", "t5_seq", "lm_seq", "frames", "mel_frames", "samples")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" | "int64"
    dims: tuple[str, ...]


@dataclass(frozen=True)
class Fp16Recipe:
    """How a component becomes fp16: ORT transformer-optimizer fusions first (in fp32), then conversion.

    ``keep_fp32``: the whole component stays fp32. ``fusion``: the optimizer's model type (None = no
    fusion) and ``fusion_options`` overrides of its FusionOptions. ``fp32_ops``: op types kept fp32 in
    addition to the converter's defaults. ``fp16_nodes``: an allow-list (regex on node names) — the rest stays
    fp32. ``attention_mask_input``: the graph input of a key-padding mask that
    attention fusion would drop; it is handed to the fused nodes as attention_bias (attention_bias.py).
    Inputs and outputs stay float32 either way.
    """

    keep_fp32: bool = False
    fusion: str | None = None
    fusion_options: tuple[tuple[str, bool], ...] = ()
    fp32_ops: tuple[str, ...] = ()
    attention_mask_input: str | None = None
    fp16_nodes: str | None = None  # a regex: only nodes whose name matches become fp16, every other node stays fp32
    bias_split_gelu: bool = False  # GEGLU tails of the widths ONNX Runtime's kernel takes → BiasSplitGelu (bias_split_gelu.py)
    pad_geglu: bool = False  # with bias_split_gelu: the other GEGLUs too, widened with zeros to the kernel's next width
    fold_biases: tuple[str, ...] = ()  # fold_bias.py's rewrites to apply (of its REWRITES): biases moved into the node after them
    # hoist_context.py: the graph inputs that stay the same across the denoising steps; the work that depends on them
    # alone moves into a graph of its own (``<name>_context.onnx``), run once per request (cross-attention K/V unpacked)
    hoist_context: tuple[str, ...] = ()
    # self_attention.py: attention written out as Reshape/Transpose/MatMul/Softmax (the export's own GPT-2 graph) fused
    # as MultiHeadAttention with its additive bias, and a Gemm's bias moved into the SkipLayerNormalization after it
    self_attention: bool = False
    # with self_attention: the softmax bias is a key-padding bias [B, 1, 1, L], expanded once over the queries for
    # MultiHeadAttention (CLAP's RoBERTa; GPT-2's is [B, 1, L, L] already)
    attention_bias_over_queries: bool = False
    # with self_attention: the q/k/v projections' bias Adds moved into MultiHeadAttention's bias input
    # (self_attention.qkv_bias_into_attention)
    attention_qkv_bias: bool = False
    # the runtime pads this component's token rows to a multiple of this (pad id, mask 0; the manifest entry's
    # "length_multiple"): ONNX Runtime's memory-efficient attention takes an attention bias only where the query length
    # is a multiple of 8 in fp16, and runs the unfused attention (7 kernels a layer instead of ~2) otherwise
    length_multiple: int = 1
    # sibling_gemms.py: Gemm nodes that read one input, each with its own weight, as one Gemm and a Split
    merge_sibling_gemms: bool = False
    # conv_bias.py: each convolution's bias as an Add after it, kept apart by the session (the entry's
    # "disabled_optimizers": ONNX Runtime's ConvAddFusion would fold it back)
    conv_bias_as_add: bool = False
    reason: str = ""


FP16_PLAIN = Fp16Recipe()


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    build: Callable  # (pipeline, constants) -> torch.nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    fp16: Fp16Recipe = FP16_PLAIN

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            t.name: {i: d for i, d in enumerate(t.dims) if d in DYNAMIC_DIMS}
            for t in self.inputs + self.outputs
        }


@dataclass(frozen=True)
class SampleShape:
    """Sizes of the dynamic dims for one export/validation sample.

    ``seq`` is the token count of both text encoders; ``frames`` the latent frame count.
    """

    batch: int
    seq: int
    frames: int

    def sizes(self, c: dict) -> dict[str, int]:
        return {
            "batch": self.batch, "clap_seq": self.seq, "t5_seq": self.seq,
            "lm_seq": self.seq + 5, "frames": self.frames,
            "mel_frames": self.frames * c["vae_scale"], "samples": self.frames * c["vae_scale"] * c["hop_length"],
        }


def _t(name, dtype, *dims):
    return TensorSpec(name, dtype, dims)


COMPONENTS: tuple[ComponentSpec, ...] = (
    ComponentSpec(
        "clap_text", lambda p, c: wrappers.ClapText(p.text_encoder),
        (_t("input_ids", "int64", "batch", "clap_seq"), _t("attention_mask", "int64", "batch", "clap_seq")),
        (_t("text_embeds", "float32", "batch", "clap_dim"),),
    ),
    ComponentSpec(
        "t5_encoder", lambda p, c: wrappers.T5Encoder(p.text_encoder_2),
        (_t("input_ids", "int64", "batch", "t5_seq"), _t("attention_mask", "int64", "batch", "t5_seq")),
        (_t("last_hidden_state", "float32", "batch", "t5_seq", "t5_dim"),),
        # Flan-T5 overflows fp16 in its feed-forward output (transformers keeps ``wo`` fp32). Only the weight-heavy
        # projections that transformers runs in fp16 too become fp16 here: attention q/k/v/o and the gated
        # feed-forward's wi_0/wi_1. Everything else stays fp32, more than transformers keeps: wo, the RMS norms,
        # the residual stream, the attention scores and softmax, the gate's GELU × linear product. The token
        # embedding's table is fp16 as in transformers (since 2026-11-27): the graph rounded each looked-up row to
        # fp16 before its first norm anyway, so the output is the same (bit-identical on the tiny model; the converter
        # raises entries below fp16's smallest subnormal, 6e-8, to it where a Cast would give 0), and the table takes
        # half the memory (63 MiB less on the full-size model). About 67 % of the weights fp16 (all fp32 before
        # 2026-11-26).
        Fp16Recipe(fp16_nodes=r"/SelfAttention/[qkvo]/MatMul$|/DenseReluDense/wi(_0|_1)?/MatMul$|/embed_tokens/Gather$",
                   reason="attention q/k/v/o and wi_0/wi_1 projections and the embedding table fp16; wo, norms, "
                          "residual stream, attention scores fp32"),
    ),
    ComponentSpec(
        "projection", lambda p, c: wrappers.Projection(p.projection_model),
        (
            _t("text_embeds", "float32", "batch", "clap_dim"),
            _t("t5_hidden_states", "float32", "batch", "t5_seq", "t5_dim"),
            _t("t5_attention_mask", "int64", "batch", "t5_seq"),
        ),
        (_t("inputs_embeds", "float32", "batch", "lm_seq", "lm_dim"), _t("attention_mask", "int64", "batch", "lm_seq")),
        Fp16Recipe(keep_fp32=True, reason="two linear layers; nothing to gain"),
    ),
    # One GPT-2 pass, run max_new_tokens times by the runtime (GPT2_GRAPHS below has the unrolled alternative).
    ComponentSpec(
        "gpt2", lambda p, c: wrappers.Gpt2Step(p.language_model),
        (_t("inputs_embeds", "float32", "batch", "lm_seq", "lm_dim"), _t("attention_mask", "int64", "batch", "lm_seq"),
         _t("last", "int64", "one")),
        (_t("last_hidden_state", "float32", "batch", "one", "lm_dim"),),
    ),
    ComponentSpec(
        "unet", lambda p, c: wrappers.UNet(p.unet),
        (
            _t("sample", "float32", "batch", "latent_channels", "frames", "latent_bins"),
            _t("timestep", "int64", "one"),
            _t("encoder_hidden_states", "float32", "batch", "max_new_tokens", "lm_dim"),
            _t("encoder_hidden_states_1", "float32", "batch", "t5_seq", "t5_dim"),
            _t("encoder_attention_mask_1", "int64", "batch", "t5_seq"),
        ),
        (_t("noise_pred", "float32", "batch", "latent_channels", "frames", "latent_bins"),),
        # The plain recipe, used with ``--fuse none``. The fp16 default is UNET_FUSED (below): the optimizer's
        # GroupNorm / NHWC-conv / LayerNorm and attention fusions, the T5 mask handed back as attention_bias.
        Fp16Recipe(reason="plain fp16 conversion (--fuse none); the default fused recipe is UNET_FUSED"),
    ),
    ComponentSpec(
        "vae_decoder", lambda p, c: wrappers.VaeDecoder(p.vae),
        (_t("latents", "float32", "batch", "latent_channels", "frames", "latent_bins"),),
        (_t("mel", "float32", "batch", "one", "mel_frames", "mel_bins"),),
        # H100 sweep 2026-11-26 (docs/benchmarks.md, 10.24 s, CUDA graph, TF32 on): fp32 6.7 ms, plain fp16 5.2 ms.
        # (The 2026-11-25 "fp16 slower" figures were taken with TF32 off.) This plain recipe (fp32) is used with
        # ``--fuse none``; the fp16 default is VAE_FUSED (fp16, GroupNorm/NHWC fused: 3.7 ms, and the 100-prompt
        # fidelity of 2026-11-26 11:52 UTC was measured with it).
        Fp16Recipe(keep_fp32=True, reason="fp32 (TF32) with --fuse none, what the first 100-prompt fidelity run "
                                          "validated; the default fused recipe is VAE_FUSED (fp16)"),
    ),
    ComponentSpec(
        "vocoder", lambda p, c: wrappers.Vocoder(p.vocoder),
        (_t("mel", "float32", "batch", "one", "mel_frames", "mel_bins"),),
        (_t("waveform", "float32", "batch", "samples"),),
        # H100 sweep 2026-11-26 (CUDA graph, cudnn_conv1d_pad_to_nc1d): fp32 + TF32 13.4 ms, plain fp16 9.1 ms,
        # fp16 + prefer_nhwc 7.5 ms (the runtime sets prefer_nhwc for this session: COMPONENT_PROVIDER_OPTIONS in
        # runtime/backends/ort.py); with TF32 off fp32 80 ms and fp16 167 ms (the earlier "fp16 slower" reading).
        Fp16Recipe(reason="plain fp16 conversion; rel-L2 against PyTorch fp32 about 1e-3 (ort-cuda-facts.md)"),
    ),
    # CLAP's input features of the waveforms to rank, from the vocoder's waveforms: resampling to CLAP's rate, fitting
    # and log-mel, on the device (the runtime computes them on the host on a CPU, where numpy and soxr are faster).
    ComponentSpec(
        "clap_features", lambda p, c: wrappers.ClapLogMel(p.feature_extractor, c["sampling_rate"]),
        (_t("audio", "float32", "batch", "samples"),),
        (_t("input_features", "float32", "batch", "one", "clap_frames", "clap_mel_bins"),),
        Fp16Recipe(keep_fp32=True, reason="log-mel features in fp32 (TF32 off: COMPONENT_PROVIDER_OPTIONS)"),
    ),
    ComponentSpec(
        "clap_audio", lambda p, c: wrappers.ClapAudio(p.text_encoder),
        (_t("input_features", "float32", "batch", "one", "clap_frames", "clap_mel_bins"),),
        (_t("audio_embeds", "float32", "batch", "clap_dim"),),
        # fp16 since 2026-11-27, as diffusers' fp16 pipeline runs it (fp32 before: 108 MiB of weights for one call per
        # request). CPU, full size, 4 synthetic waveforms: rel-L2 of the embeddings 5.8e-4 against fp32, the cosine
        # similarities between them within 2e-6 of fp32's.
        Fp16Recipe(reason="plain fp16 conversion, as diffusers' fp16 pipeline; ranking only, once per request"),
    ),
)

BY_NAME = {c.name: c for c in COMPONENTS}

# The two GPT-2 graphs (``export --gpt2-graph``; the manifest's gpt2 entry records which, as "graph").
# "step" (the default): one pass over a fixed-size buffer, run 8 times — its ONNX Runtime session is created in a
# fraction of the time. "unrolled": the 8 generation steps in one graph with an explicit KV cache (the default until
# 2026-11-26; one call, less arithmetic: faster on the CPU; its 5 s session creation was the GPU cold start's
# critical path, docs/benchmarks.md). Artefacts without "graph" are "unrolled".
GPT2_GRAPHS = {
    "step": BY_NAME["gpt2"],
    "unrolled": ComponentSpec(
        "gpt2", lambda p, c: wrappers.Gpt2GenerateKV(p.language_model, c["max_new_tokens"]),
        (_t("inputs_embeds", "float32", "batch", "lm_seq", "lm_dim"), _t("attention_mask", "int64", "batch", "lm_seq")),
        (_t("generated", "float32", "batch", "max_new_tokens", "lm_dim"),),
    ),
}


def spec_of(name: str, gpt2_graph: str) -> ComponentSpec:
    """The spec an artefact's component was exported from (``gpt2_graph``: its ``Artifacts.gpt2_graph``)."""
    return GPT2_GRAPHS[gpt2_graph] if name == "gpt2" else BY_NAME[name]

# Fused recipes: the default for fp16 exports of the components in FUSED_RECIPES (below).
VAE_FUSED = Fp16Recipe(fusion="vae", fusion_options=(("enable_attention", False),),
                       reason="GroupNorm and NHWC convolution fused")

UNET_FUSED = Fp16Recipe(
    fusion="unet",
    # ORT's own BiasSplitGelu fusion would take every GEGLU, and the CUDA kernel rejects AudioLDM 2's widths other
    # than 5120 (shared/reference/ort-cuda-facts.md §3): it stays off, and bias_split_gelu.py fuses only the 18
    # GEGLUs of the 640-channel blocks (H100, docs/benchmarks.md run AA: 54 fewer kernels a step, 6.50 → 6.40 ms of
    # kernels, UNet validate 3.6e-3 / 7.6e-3, 100-prompt fidelity 1.92e-3 as before).
    # Attention is fused (packed QKV for self-attention, packed KV for cross-attention, as ORT's defaults for
    # Stable Diffusion); the stock fusion drops the T5 stream's key-padding mask (§2), so attention_bias.py
    # hands that mask back to the 16 T5 cross-attentions that read it (of 96 fused attention nodes).
    fusion_options=(("enable_bias_splitgelu", False),),
    attention_mask_input="encoder_attention_mask_1",
    bias_split_gelu=True,
    # The other 30 GEGLUs (256- and 384-channel blocks, 2H = 2048 and 3072) widened with zeros to 2560 and 5120 so
    # that the kernel takes them too (bias_split_gelu.py). H100, docs/benchmarks.md run AJ: 90 kernels a step fewer,
    # UNet kernels 6.09 → 5.75 ms a step, 166.7 → 157.0 ms end to end, DDIM-200 1.393 → 1.312 s, UNet validate
    # 3.59e-3 / 7.62e-3, 100-prompt fidelity 1.91e-3 as before; +40 MiB of weights in the file, +12 MiB on the GPU.
    pad_geglu=True,
    # fold_bias.py: the ResNets' convolution and time-embedding biases are added in the SkipGroupNorm after them, and
    # each transformer's feed-forward output bias is folded through proj_out into proj_out's bias (full size: 53 + 22
    # + 48 biases, 123 kernels a step fewer; H100, docs/benchmarks.md run AD: UNet kernels 6.39 → 6.08 ms a step,
    # 4 % end to end, 100-prompt fidelity 1.91e-3 as before). VAE_FUSED does not fold: there it raised the 100-prompt
    # error to 1.95e-3 (max 2.09e-3 against diffusers fp16's 2.10e-3) for ~30 µs a request.
    # And each transformer's proj_in bias Add and norm1 LayerNorm as one SkipLayerNormalization (proj_in's weight
    # halved, its output both input and skip; H100, run AL: 48 kernels a step fewer, UNet kernels 5.75 → 5.50 ms,
    # 159.1 → 154.9 ms end to end, UNet validate 3.55e-3 / 7.64e-3, 100-prompt fidelity 1.92e-3 as before).
    fold_biases=("skip_group_norm", "linear_map", "layer_norm"),
    # hoist_context.py: the 32 cross-attentions' K and V projections of the two text streams (unpacked, so that the
    # attention reads them without its unpacking kernel) and the T5 mask's conversion to an attention bias depend on
    # the text alone: they run once per request in unet_context.onnx instead of at every step.
    hoist_context=("encoder_hidden_states", "encoder_hidden_states_1", "encoder_attention_mask_1"),
    # sibling_gemms.py: the 22 ResNets' time-embedding projections, which all read the one time embedding, as one GEMM
    # per output width over their weights side by side, each with a Split (full size: 4 GEMMs and 4 Splits a step
    # instead of 22 launch-bound GEMMs of ~3.4 µs, run AN's profile).
    merge_sibling_gemms=True,
    reason="GroupNorm, NHWC convolution, LayerNorm, attention (T5 mask kept as attention_bias) and the GEGLU tails fused "
           "(BiasSplitGelu, the narrower ones widened with zeros to the kernel's widths); biases folded into the "
           "SkipGroupNorm or bias after them; the text-only work (cross-attention K/V) in a context graph run once "
           "per request; the ResNets' time-embedding projections as one GEMM per width",
)

# ``export --unet-layout nchw``: the fused UNet without NHWC convolutions, so that the runtime can place its weights in
# one allocation (``packed_weights``; an NhwcConv learns that its weights are NHWC only while ONNX Runtime prepacks,
# which packing turns off). H100, run R (docs/benchmarks.md): peak memory 3307 MiB against the default's 3405 (3105
# with the shared arena, under diffusers' 3129), at a UNet step of 8.6 ms against 7.5 (200 vs 179 ms end to end): the
# GroupNorms stay channels-last, with transposes around them, as ONNX Runtime's CUDA GroupNorm supports no other
# layout ("only the channels_last layout is supported", run R).
# Without fold_biases, pad_geglu and merge_sibling_gemms: runs R and T measured this layout before any of them, and
# each was measured on NHWC only; widened GEGLUs would also add their 40 MiB in full here, where the weights are packed
# to save memory.
UNET_FUSED_NCHW = dataclasses.replace(
    UNET_FUSED, fusion_options=UNET_FUSED.fusion_options + (("enable_nhwc_conv", False),), fold_biases=(),
    pad_geglu=False, merge_sibling_gemms=False,
    reason="GroupNorm, LayerNorm, attention (T5 mask kept as attention_bias) and the GEGLU tails the BiasSplitGelu "
           "kernel takes fused; convolutions NCHW (its weights can be packed); the text-only work in a context graph "
           "run once per request")
UNET_LAYOUTS = {"nhwc": UNET_FUSED, "nchw": UNET_FUSED_NCHW}

# The previous default, for comparison runs (scripts/ort_sweep.py --unet-recipes): attention left unfused.
UNET_FUSED_NO_ATTENTION = Fp16Recipe(
    fusion="unet",
    fusion_options=(("enable_attention", False), ("enable_packed_qkv", False), ("enable_packed_kv", False),
                    ("enable_bias_splitgelu", False)),
    reason="GroupNorm, NHWC convolution and LayerNorm fused; attention left unfused",
)

# GPT-2 (either graph of GPT2_GRAPHS): ONNX Runtime's gpt2 fusions (each residual Add and the LayerNorm after it as one
# SkipLayerNormalization, the feed-forward's bias and GELU as one FastGelu, the Conv1D Gemms before them as MatMuls
# with the bias moved into the fused node), then the attention, which the optimizer does not match in the export's
# own graph, as MultiHeadAttention (self_attention.py; its attention_bias is the graph's causal-and-padding bias).
# The optimizer's own attention fusion stays off: it looks for transformers' GPT-2 attention with past state. (It logs
# "Please specify parameters of num_heads and hidden_size": those are for that attention fusion only.)
GPT2_FUSED = Fp16Recipe(
    fusion="gpt2", fusion_options=(("enable_attention", False),), self_attention=True,
    reason="LayerNorm with the residual Add (SkipLayerNormalization), bias + GELU (FastGelu) and attention "
           "(MultiHeadAttention with the causal-and-padding bias) fused")

# T5 (its mixed-precision recipe above): ONNX Runtime's t5 fusions, each residual Add and the RMS norm after it as one
# SkipSimplifiedLayerNormalization and the gated feed-forward's tanh GELU as one FastGelu, all in the fp32 part (the
# allow-list of fp16 nodes names MatMuls and the embedding, which the fusions leave as they are). The attention stays
# unfused: its scores are fp32 here, where ONNX Runtime's fused kernels take fp16.
T5_FUSED = dataclasses.replace(
    BY_NAME["t5_encoder"].fp16, fusion="t5", fusion_options=(("enable_attention", False),),
    reason=BY_NAME["t5_encoder"].fp16.reason + "; RMS norms with their residual Add and the GELU fused (fp32)")
# CLAP's text branch (RoBERTa): ONNX Runtime's bert fusions, the residual Adds and LayerNorms as SkipLayerNormalization
# and each feed-forward's bias and GELU as BiasGelu, with the optimizer's own attention fusion off (it does not match
# this graph: its mask is a Where, not (1 - mask) × c). CLAP_TEXT_FUSED, the default of runs CG–CN, stops there.
CLAP_TEXT_FUSED = Fp16Recipe(
    fusion="bert", fusion_options=(("enable_attention", False),),
    reason="LayerNorm with the residual Add (SkipLayerNormalization) and bias + GELU (BiasGelu) fused")
# The default of runs CN–CR: its attention as MultiHeadAttention too (self_attention.py, the [B, 1, 1, L] padding bias
# expanded over the queries once for all layers). The branch runs uncaptured on the text stage's critical path, so its
# time is its launches: H200, run CN (docs/benchmarks.md), the projection waits 0.6 instead of 1.4 ms for it after T5,
# `bench` 139.6 against 140.3 ms (three alternating rounds each), same validation, fidelity and peak memory.
CLAP_TEXT_ATTENTION = dataclasses.replace(
    CLAP_TEXT_FUSED, self_attention=True, attention_bias_over_queries=True,
    reason=CLAP_TEXT_FUSED.reason + "; attention as MultiHeadAttention (the padding bias expanded over the queries)")
# The default since run CR: the q/k/v bias Adds in MultiHeadAttention too, and the token rows padded to a multiple of
# 8 so that ONNX Runtime's memory-efficient attention applies (without it each layer ran 3 bias Adds and the unfused
# attention, 7 kernels, for a 9-token prompt). H200, runs CQ–CR: CLAP's kernels 0.53 ms in 205 launches against 0.61
# in 277 (its 16-token rows against 9), the projection waits 0.3 instead of 0.7 ms for it after T5, the text stage
# 10.0 against 10.3 ms (`bench`, three rounds each), the same validation, 100-prompt fidelity and peak memory.
CLAP_TEXT_MEA = dataclasses.replace(
    CLAP_TEXT_ATTENTION, attention_qkv_bias=True, length_multiple=8,
    reason=CLAP_TEXT_ATTENTION.reason + "; q/k/v biases in it, tokens padded to a multiple of 8 (memory-efficient "
                                        "attention)")
# The default since run CR: the vocoder with its 97 convolution biases as Add nodes (ONNX Runtime's own broadcast Add
# instead of cuDNN's ~12 µs bias op after each convolution; export/conv_bias.py; the manifest entry's
# "disabled_optimizers" keeps ConvAddFusion from folding them back). H200, runs CQ–CR, with 38 of the 97 moved (the
# rewrite then missed biases behind Identity nodes and the transposed convolutions'): the vocoder's kernels 6.97
# against 7.16 ms, its stage in `bench` 7.73–7.79 against 7.89–7.97 ms (three rounds each), the same validation,
# 100-prompt fidelity and peak memory. All 97 (run CS, another H200): 6.71 ms of kernels, its stage 7.52–7.60 ms.
VOCODER_BIAS_ADD = dataclasses.replace(
    BY_NAME["vocoder"].fp16, conv_bias_as_add=True,
    reason=BY_NAME["vocoder"].fp16.reason + "; convolution biases as Add nodes (ConvAddFusion off for the session)")

# ``export --precision fp16`` converts these components with their fused recipe by default (``--fuse none``: plain).
# Measured on an H100 (docs/benchmarks.md, 2026-11-26): norm/conv fusions 273 ms end to end vs 339 ms plain in one run
# (UNet step 12.2 vs 15.3 ms, VAE 3.7 vs 7.5 ms); attention fused as well: UNet session 7.09 vs 10.96 ms at the same
# rel-L2 (3.83e-3 against fp32), 190 ms end to end; 100-prompt fidelity 1.77e-3 (diffusers fp16: 1.97e-3). The cost is
# export time: the fused full-size export takes 320-420 s on the device vs 142-162 s. The vocoder's entry rewrites rather
# than fuses (its convolution biases as Adds); it is here so that ``--fuse`` names it like the others.
FUSED_RECIPES = {"unet": UNET_FUSED, "vae_decoder": VAE_FUSED, "gpt2": GPT2_FUSED, "t5_encoder": T5_FUSED,
                 "clap_text": CLAP_TEXT_MEA, "vocoder": VOCODER_BIAS_ADD}


def pipeline_constants(pipe) -> dict:
    """Every number the runtime needs about a pipeline, read from its configs."""
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    voc = pipe.vocoder.config
    hop = 1
    for r in voc.upsample_rates:
        hop *= int(r)
    fe = pipe.feature_extractor
    lm = pipe.language_model.config
    return {
        "clap_dim": int(pipe.text_encoder.config.projection_dim),
        "t5_dim": int(pipe.text_encoder_2.config.d_model),
        "lm_dim": int(lm.n_embd),
        "lm_max_positions": int(lm.n_positions),
        "max_new_tokens": int(getattr(lm, "max_new_tokens", 8) or 8),
        "latent_channels": int(pipe.unet.config.in_channels),
        "unet_sample_size": int(pipe.unet.config.sample_size),
        "vae_scale": vae_scale,
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "mel_bins": int(voc.model_in_dim),
        "latent_bins": int(voc.model_in_dim) // vae_scale,
        "hop_length": hop,
        "sampling_rate": int(voc.sampling_rate),
        "clap_vocab": int(pipe.text_encoder.config.text_config.vocab_size),
        "t5_vocab": int(pipe.text_encoder_2.config.vocab_size),
        "clap_model_max_length": int(pipe.tokenizer.model_max_length),
        "t5_model_max_length": int(pipe.tokenizer_2.model_max_length),
        "clap_sampling_rate": int(fe.sampling_rate),
        "clap_frames": int(fe.nb_max_samples // fe.hop_length + 1),
        "clap_mel_bins": int(fe.feature_size),
        "one": 1,
    }


def feature_extractor_config(pipe) -> dict:
    fe = pipe.feature_extractor
    keys = ("feature_size", "sampling_rate", "hop_length", "max_length_s", "fft_window_size",
            "frequency_min", "frequency_max", "top_db", "truncation", "padding")
    return {k: getattr(fe, k) for k in keys}


def input_shapes(spec: ComponentSpec, consts: dict, shape: SampleShape) -> dict[str, tuple[int, ...]]:
    """{input name: concrete shape} of ``spec``'s inputs: its named dims resolved from the artefacts' constants
    and one SampleShape."""
    sizes = {**consts, **shape.sizes(consts)}
    return {t.name: tuple(sizes[d] for d in t.dims) for t in spec.inputs}


def sample_inputs(spec: ComponentSpec, consts: dict, shape: SampleShape, seed: int = 0) -> dict:
    """Random inputs of the right dtypes and shapes; masks pad the tail of every row but the first,
    so that masking is exercised. Returns {input name: torch tensor}."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sizes = {**consts, **shape.sizes(consts)}
    shapes = input_shapes(spec, consts, shape)
    out = {}
    for t in spec.inputs:
        dims = list(shapes[t.name])
        if "mask" in t.name:
            mask = torch.ones(dims, dtype=torch.int64)
            for row in range(1, dims[0]):
                mask[row, dims[1] - min(row, dims[1] - 1):] = 0
            out[t.name] = mask
        elif t.name == "input_ids":
            vocab = consts["clap_vocab"] if spec.name == "clap_text" else consts["t5_vocab"]
            out[t.name] = torch.randint(3, vocab, dims, generator=gen)
        elif t.name == "timestep":
            out[t.name] = torch.randint(0, 1000, dims, generator=gen)
        elif t.name == "last":  # Gpt2Step: a position inside the buffer, not its end
            out[t.name] = torch.tensor([sizes["lm_seq"] * 2 // 3], dtype=torch.int64)
        else:
            out[t.name] = torch.randn(dims, generator=gen)
    if spec.name == "clap_text":  # RoBERTa framing: <s> … </s>, padding with <pad>=1 where masked
        ids, mask = out["input_ids"], out["attention_mask"]
        ids[:, 0] = 0
        ids[mask == 0] = 1
    return out
