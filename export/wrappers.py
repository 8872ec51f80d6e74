"""Thin torch modules giving each AudioLDM 2 submodel a flat, named, tensor-only signature for ONNX.

Each wrapper does what diffusers' ``AudioLDM2Pipeline`` does around the submodel, and nothing more;
the component table (``components.py``) names their inputs, outputs and dynamic axes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime.audio import CLAP_PADDINGS
from ..runtime.errors import ExportError
from .resampling import QUALITY, soxr_polyphase

# Additive mask value: large enough to zero a softmax weight, finite in fp16 (fp16 conversion later).
MASK_VALUE = -65504.0


def padding_mask_4d(model, attention_mask):
    """[B, S] int64 padding mask → the mask transformers' attention takes as is, or the 2-D mask unchanged.

    transformers ≥ 5 (``masking_utils``) builds the 4-D mask by indexing the 2-D one with positions computed
    from its shape (the sequence length): shape arithmetic that ONNX Runtime's CUDA provider runs on the host,
    whose host→device copy forbids capturing clap_text and t5_encoder as CUDA graphs
    (docs/results/ort-placement-2026-11-26.log). A 4-D mask passed in is used as is, so build the same mask from
    the mask's values alone: [B, 1, 1, S] — bool (True = attend) for SDPA, additive 0 / dtype-min for eager,
    as ``sdpa_mask`` / ``eager_mask`` would (they broadcast over the query axis, which padding never masks).
    Older transformers and other attention implementations get the 2-D mask.
    """
    import sys

    impl = getattr(model.config, "_attn_implementation", None)
    module = sys.modules.get(type(model).__module__)
    if impl not in ("sdpa", "eager") or not hasattr(module, "create_bidirectional_mask"):
        return attention_mask
    keep = attention_mask[:, None, None, :].to(torch.bool)
    if impl == "sdpa":
        return keep
    dtype = next(model.parameters()).dtype
    return torch.where(keep, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def _pooled(output):
    """transformers 5 returns BaseModelOutputWithPooling from get_*_features, 4.x a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClapText(nn.Module):
    """input_ids, attention_mask int64 [B, S] → text_embeds float32 [B, P] (L2-normalised)."""

    def __init__(self, clap):
        super().__init__()
        self.clap = clap

    def forward(self, input_ids, attention_mask):
        mask = padding_mask_4d(self.clap.text_model, attention_mask)
        return _pooled(self.clap.get_text_features(input_ids=input_ids, attention_mask=mask))


class ClapAudio(nn.Module):
    """input_features float32 [B, 1, T, M] (CLAP log-mel) → audio_embeds float32 [B, P] (L2-normalised)."""

    def __init__(self, clap):
        super().__init__()
        self.clap = clap

    def forward(self, input_features):
        return _pooled(self.clap.get_audio_features(input_features=input_features))


class ClapLogMel(nn.Module):
    """CLAP's input features of the waveforms to rank, as a graph for the GPU: audio float32 [B, N] at the vocoder's
    rate → input_features float32 [B, 1, 1 + M / hop, mels] at CLAP's (M = max_length_s · CLAP's rate), what
    ``ClapAudio`` takes. The same steps as diffusers' ranking — ``librosa.resample`` (soxr HQ) to CLAP's rate, then
    transformers' ``ClapFeatureExtractor`` in AudioLDM 2's ``rand_trunc`` mode — with no host work:

    1. resampling: soxr's own response as polyphase filters (``resampling.soxr_polyphase``: one convolution with one
       output channel per phase, then the phases interleaved), which reproduces soxr to float32 rounding;
    2. fitting to M samples (``runtime.audio.ClapFeatures._fit``: the first M samples of a longer row — transformers
       picks a random offset, a server must be deterministic —, a shorter one repeated and zero-padded as the
       config's ``padding`` says) and reflect-padding by n_fft/2 for centred frames, as one gather whose indices are
       computed from the row length inside the graph (no Python branch on it, so any length traces the same graph);
    3. log-mel: periodic Hann window, |STFT|², slaney mel filters, 10·log10 with a 1e-10 floor. The STFT is one
       strided convolution with the windowed DFT basis (cos and −sin rows, computed in float64, stored float32).

    4 rows of 10.24 s on the H100 machine (features_timing.py): 2.2 ms through this graph (run V), against 10.9 ms
    when the host resampled for the previous graph (run S) and 60–77 ms for numpy's FFT alone (run H); batch 4's
    ranking stage went from 19.5 to 6–7 ms (docs/benchmarks.md). Always fp32."""

    def __init__(self, feature_extractor, audio_rate: int):
        super().__init__()
        import numpy as np

        fe = feature_extractor
        self.resampler = soxr_polyphase(int(audio_rate), int(fe.sampling_rate))
        self.register_buffer("polyphase", torch.tensor(self.resampler.weight[:, None, :]))  # [ratio, 1, taps]
        n_fft, self.hop = int(fe.fft_window_size), int(fe.hop_length)
        if fe.padding not in CLAP_PADDINGS:
            raise ExportError(f"CLAP feature extractor padding {fe.padding!r} is not one of {', '.join(CLAP_PADDINGS)}")
        self.padding, self.max_samples = fe.padding, int(fe.nb_max_samples)
        # Index into the fitted row of each sample of the reflect-padded one (numpy's "reflect": no edge repeat).
        fitted = np.abs(np.arange(-(n_fft // 2), self.max_samples + n_fft // 2))
        fitted = np.where(fitted >= self.max_samples, 2 * (self.max_samples - 1) - fitted, fitted)
        self.register_buffer("reflected", torch.tensor(fitted, dtype=torch.int64))  # [M + n_fft]
        self.bins = n_fft // 2 + 1
        window = np.hanning(n_fft + 1)[:-1]  # periodic Hann, as transformers' window_function(n, "hann")
        angle = 2.0 * np.pi * np.outer(np.arange(self.bins), np.arange(n_fft)) / n_fft
        basis = np.concatenate([np.cos(angle), -np.sin(angle)]) * window  # [2·bins, n_fft]: real rows, then imaginary
        self.register_buffer("basis", torch.tensor(basis[:, None, :], dtype=torch.float32))
        self.register_buffer("mel_filters", torch.tensor(fe.mel_filters_slaney, dtype=torch.float32))  # [bins, mels]

    def manifest_extra(self) -> dict:
        """What the manifest records of the resampler baked into the graph."""
        r = self.resampler
        return {"resampler": {"library": "soxr", "version": r.soxr_version, "quality": QUALITY, "ratio": r.ratio,
                              "taps_per_phase": int(r.weight.shape[1])}}

    def resample(self, audio):
        """[B, N] → [B, ratio·N] at CLAP's rate."""
        r = self.resampler
        padded = torch.nn.functional.pad(audio[:, None, :], (r.pad_left, r.pad_right))
        phases = torch.nn.functional.conv1d(padded, self.polyphase)  # [B, ratio, N]
        return phases.transpose(1, 2).reshape(audio.shape[0], -1)

    def fit_and_pad(self, audio):
        """[B, L] → [B, M + n_fft]: fitted to M samples, then reflect-padded."""
        # The row length as device data (a sum of ones): one taken from Shape would be computed on the host and copied
        # to the device for the index arithmetic, which forbids capturing the graph (fold_shapes.py); and a graph
        # value, not a constant traced from the export's sample.
        length = torch.ones_like(audio[0]).sum().to(torch.int64)
        src = torch.remainder(self.reflected, length)  # the sample each position repeats (repeat, repeatpad)
        if self.padding == "repeatpad":  # ⌊M / L⌋ whole copies, then zeros (one copy, cut: a row longer than M)
            keep = (self.reflected < length) | (self.reflected < torch.div(self.max_samples, length,
                                                                           rounding_mode="trunc") * length)
        elif self.padding == "pad":
            src, keep = torch.minimum(self.reflected, length - 1), self.reflected < length
        else:  # "repeat": copies cut to M
            keep = torch.ones_like(self.reflected, dtype=torch.bool)
        return torch.index_select(audio, 1, src) * keep.to(audio.dtype)

    def forward(self, audio):
        waveform = self.fit_and_pad(self.resample(audio))
        spectrum = torch.nn.functional.conv1d(waveform[:, None, :], self.basis, stride=self.hop)  # [B, 2·bins, T]
        real, imag = spectrum[:, : self.bins], spectrum[:, self.bins:]
        power = (real * real + imag * imag).transpose(1, 2)  # [B, T, bins]
        mel = torch.matmul(power, self.mel_filters)  # [B, T, mels]
        return (10.0 * torch.log10(torch.clamp(mel, min=1e-10)))[:, None]


class T5Encoder(nn.Module):
    """input_ids, attention_mask int64 [B, S] → last_hidden_state float32 [B, S, D_t5]."""

    def __init__(self, t5):
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids, attention_mask):
        return self.t5(input_ids=input_ids, attention_mask=padding_mask_4d(self.t5.encoder, attention_mask))[0]


class Projection(nn.Module):
    """CLAP [B, P] + T5 [B, S, D_t5] with mask [B, S] → GPT-2 input [B, S + 5, D_lm] and mask [B, S + 5].

    As diffusers: CLAP becomes one token, each stream is framed by learned SOS/EOS embeddings.
    """

    def __init__(self, projection_model):
        super().__init__()
        self.proj = projection_model

    def forward(self, text_embeds, t5_hidden_states, t5_attention_mask):
        clap = text_embeds[:, None, :]
        clap_mask = torch.ones_like(t5_attention_mask[:, :1])
        out = self.proj(
            hidden_states=clap, hidden_states_1=t5_hidden_states,
            attention_mask=clap_mask, attention_mask_1=t5_attention_mask,
        )
        return out.hidden_states, out.attention_mask


def gpt2_base(language_model):
    """The GPT-2 trunk of a ``GPT2Model`` or a ``GPT2LMHeadModel`` (diffusers issue #12630)."""
    base = getattr(language_model, "transformer", language_model)
    cfg = base.config
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
        raise NotImplementedError("GPT-2 variants with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn")
    return base


class Gpt2GenerateKV(nn.Module):
    """The 8-step hidden-state generation of diffusers' ``generate_language_model``, one graph.

    inputs_embeds float32 [B, L, D], attention_mask int64 [B, L] → generated float32 [B, N, D]
    (N = max_new_tokens). Step 0 runs the prompt and keeps each layer's keys/values; steps 1..N-1
    run one token against that cache (an explicit KV cache, unrolled). Positions count from 0 over
    padding, as transformers' GPT-2 does when no position_ids are given.
    """

    def __init__(self, language_model, max_new_tokens: int):
        super().__init__()
        self.gpt2 = gpt2_base(language_model)
        self.max_new_tokens = max_new_tokens
        self.n_head = self.gpt2.config.n_head

    def _attend(self, attn, x, cache_k, cache_v, bias):
        b, t, d = x.shape
        hd = d // self.n_head
        q, k, v = attn.c_attn(x).split(d, dim=2)
        q, k, v = (z.reshape(b, t, self.n_head, hd).transpose(1, 2) for z in (q, k, v))
        if cache_k is not None:
            k = torch.cat([cache_k, k], dim=2)
            v = torch.cat([cache_v, v], dim=2)
        w = torch.matmul(q, k.transpose(-1, -2)) / (hd**0.5) + bias
        o = torch.matmul(torch.softmax(w, dim=-1), v).transpose(1, 2).reshape(b, t, d)
        return attn.c_proj(o), k, v

    def _forward(self, x, positions, caches, bias):
        """Every position's final hidden state [B, T, D] and each layer's keys/values."""
        h = x + self.gpt2.wpe(positions)
        new_caches = []
        for i, block in enumerate(self.gpt2.h):
            ck, cv = caches[i] if caches else (None, None)
            a, k, v = self._attend(block.attn, block.ln_1(h), ck, cv, bias)
            h = h + a
            h = h + block.mlp(block.ln_2(h))
            new_caches.append((k, v))
        return self.gpt2.ln_f(h), new_caches

    def _prompt(self, inputs_embeds, attention_mask):
        """The whole sequence at once, causal and key-padding masked: (hidden [B, L, D], caches, positions [L])."""
        b, length, _ = inputs_embeds.shape
        keep = attention_mask.to(inputs_embeds.dtype)  # [B, L]
        idx = torch.arange(length, device=inputs_embeds.device)
        causal = (idx[None, :] <= idx[:, None]).to(inputs_embeds.dtype)  # [L, L]
        allowed = causal[None, None] * keep[:, None, None, :]
        bias = (1.0 - allowed) * MASK_VALUE
        hidden, caches = self._forward(inputs_embeds, idx[None], None, bias)
        return hidden, caches, idx

    def forward(self, inputs_embeds, attention_mask):
        keep = attention_mask.to(inputs_embeds.dtype)  # [B, L]
        hidden, caches, idx = self._prompt(inputs_embeds, attention_mask)
        out = hidden[:, -1:, :]
        generated = [out]
        ones = torch.ones_like(keep[:, :1])
        for step in range(1, self.max_new_tokens):
            keep = torch.cat([keep, ones], dim=1)  # the new token is attended, as diffusers extends the mask
            bias = ((1.0 - keep) * MASK_VALUE)[:, None, None, :]
            pos = (idx[-1:] + step)[None]
            out, caches = self._forward(out, pos, caches, bias)
            generated.append(out)
        return torch.cat(generated, dim=1)


class Gpt2Step(Gpt2GenerateKV):
    """One generation step of diffusers' ``generate_language_model`` over a fixed-size buffer, the runtime
    running it ``max_new_tokens`` times (``runtime/conditioning.py``): a graph of one GPT-2 pass instead of
    eight, which ONNX Runtime creates in a fraction of the unrolled graph's time (its session creation was
    the cold start's critical path), and one buffer width serves a whole range of prompt lengths.

    inputs_embeds float32 [B, S, D], attention_mask int64 [B, S], last int64 [1] → last_hidden_state float32
    [B, 1, D], the final hidden state at index ``last``. The caller keeps the sequence so far at the start of
    the buffer (mask 1 on its attended positions, as the projection gave it plus 1 for each generated state)
    and mask 0 on the unused tail; causal masking keeps the tail from reaching ``last``. Positions are buffer
    indices, as transformers' GPT-2 numbers a sequence without position_ids, so the result equals the
    unrolled graph's step for step. Each call recomputes the whole buffer (no KV cache): on the GPU one pass
    is launch-bound either way; on the CPU the unrolled KV-cache graph is faster (``--gpt2-graph unrolled``).
    """

    def __init__(self, language_model):
        super().__init__(language_model, max_new_tokens=1)

    def forward(self, inputs_embeds, attention_mask, last):
        hidden, _, _ = self._prompt(inputs_embeds, attention_mask)
        return torch.index_select(hidden, 1, last)


class Gpt2GenerateRecompute(nn.Module):
    """Same contract as ``Gpt2GenerateKV``, recomputing the whole sequence at every step with the
    transformers module itself (kept for the CPU measurement that chose the KV-cache graph)."""

    def __init__(self, language_model, max_new_tokens: int):
        super().__init__()
        self.gpt2 = gpt2_base(language_model)
        self.max_new_tokens = max_new_tokens

    def forward(self, inputs_embeds, attention_mask):
        x, mask = inputs_embeds, attention_mask
        for _ in range(self.max_new_tokens):
            h = self.gpt2(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
            x = torch.cat([x, h[:, -1:, :]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return x[:, -self.max_new_tokens:, :]


class UNet(nn.Module):
    """sample float32 [B, C, F, M], timestep int64 [1], encoder_hidden_states (GPT-2) [B, N, D_lm],
    encoder_hidden_states_1 (T5) [B, S, D_t5], encoder_attention_mask_1 int64 [B, S] → noise_pred
    float32 [B, C, F, M]."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, encoder_hidden_states_1, encoder_attention_mask_1):
        return self.unet(
            sample, timestep[0],
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_1=encoder_hidden_states_1,
            encoder_attention_mask_1=encoder_attention_mask_1,
            return_dict=False,
        )[0]


class VaeDecoder(nn.Module):
    """latents float32 [B, C, F, M] → mel float32 [B, 1, F·s, M·s]. Applies ``1/scaling_factor``
    inside the graph, as the pipeline does before ``vae.decode``: the runtime passes raw latents."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.inv_scale = 1.0 / float(vae.config.scaling_factor)

    def forward(self, latents):
        return self.vae.decode(latents * self.inv_scale).sample


class Vocoder(nn.Module):
    """mel float32 [B, 1, T, M] (the VAE's output as is) → waveform float32 [B, T · hop]."""

    def __init__(self, vocoder):
        super().__init__()
        self.vocoder = vocoder

    def forward(self, mel):
        return self.vocoder(mel[:, 0])
