"""Where an AudioLDM 2 pipeline comes from: a hub id, a local diffusers folder, or random weights.

Random weights are built from configs shipped in ``export/configs/<name>/`` (``tiny`` for CI and the
offline demo, ``audioldm2`` for full-size speed and parity work), with tokenizers built in code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import ExportError

log = logging.getLogger("audioldm2_trt.export")

CONFIG_ROOT = Path(__file__).parent / "configs"


def random_config_names() -> list[str]:
    return sorted(p.name for p in CONFIG_ROOT.iterdir() if p.is_dir())


@dataclass(frozen=True)
class Source:
    """What to load: exactly one of ``random_config`` or ``model`` (hub id or local folder)."""

    model: str | None = None
    random_config: str | None = None
    seed: int = 0

    def describe(self) -> dict:
        if self.random_config:
            return {"kind": "random", "config": self.random_config, "seed": self.seed}
        kind = "local" if Path(self.model).exists() else "hub"
        return {"kind": kind, "model": str(self.model)}


def load_pipeline(source: Source):
    """Load a float32 ``AudioLDM2Pipeline`` on the CPU, in eval mode."""
    if source.random_config:
        pipe = build_random_pipeline(source.random_config, seed=source.seed)
    else:
        pipe = _load_pretrained(source.model)
    pipe.set_progress_bar_config(disable=True)
    for name in ("vae", "text_encoder", "text_encoder_2", "projection_model", "language_model", "unet", "vocoder"):
        getattr(pipe, name).eval()
    return pipe


def _load_pretrained(model: str):
    path = Path(model)
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise ExportError(f"model folder {model!r} does not exist")
        index = path / "model_index.json"
        if not index.is_file():
            raise ExportError(f"{model!r} is not a diffusers pipeline folder: it has no model_index.json")
        cls = json.loads(index.read_text()).get("_class_name")
        if cls != "AudioLDM2Pipeline":
            raise ExportError(f"{model!r} holds a {cls!r}, not an AudioLDM2Pipeline")
    import torch
    from diffusers import AudioLDM2Pipeline

    try:
        return AudioLDM2Pipeline.from_pretrained(model, torch_dtype=torch.float32)
    except (OSError, ValueError) as err:  # hub unreachable, missing files, bad config
        raise ExportError(f"could not load AudioLDM2Pipeline from {model!r}: {err}") from err


def _read_configs(name: str) -> dict[str, dict]:
    folder = CONFIG_ROOT / name
    if not folder.is_dir():
        raise ExportError(
            f"unknown random-weights config {name!r}; choose one of {', '.join(random_config_names())}"
        )
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def build_random_pipeline(name: str, seed: int = 0):
    """Build an ``AudioLDM2Pipeline`` with random weights from a shipped config folder.

    The language model is a ``GPT2LMHeadModel`` (diffusers' own GPT-2 loop needs GenerationMixin
    under transformers 5, diffusers issue #12630); the export handles ``GPT2Model`` as well.
    """
    import torch
    from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import (
        ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig,
        GPT2Config, GPT2LMHeadModel, SpeechT5HifiGan, SpeechT5HifiGanConfig, T5Config, T5EncoderModel,
    )

    from .tokenizer_builder import build_clap_tokenizer, build_t5_tokenizer, wrap_for_transformers

    cfg = _read_configs(name)
    torch.manual_seed(seed)
    clap_cfg = cfg["text_encoder"]
    text_encoder = ClapModel(ClapConfig(
        text_config=ClapTextConfig(**clap_cfg["text_config"]).to_dict(),
        audio_config=ClapAudioConfig(**clap_cfg["audio_config"]).to_dict(),
        projection_dim=clap_cfg["projection_dim"],
    ))
    text_encoder_2 = T5EncoderModel(T5Config(**cfg["text_encoder_2"]))
    lm_cfg = dict(cfg["language_model"])
    max_new_tokens = lm_cfg.pop("max_new_tokens")
    lm_cfg.setdefault("bos_token_id", 0)
    lm_cfg.setdefault("eos_token_id", 0)
    language_model = GPT2LMHeadModel(GPT2Config(**lm_cfg))
    language_model.config.max_new_tokens = max_new_tokens
    projection_model = AudioLDM2ProjectionModel(**cfg["projection_model"])
    unet = AudioLDM2UNet2DConditionModel(**_tuples(cfg["unet"]))
    vae = AutoencoderKL(**cfg["vae"])
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**cfg["vocoder"]))
    _randomize_norms(unet, vae, vocoder, seed=seed)
    _rescale_vocoder(vocoder, seed=seed)

    tok_cfg = cfg["tokenizers"]
    tokenizer, tokenizer_2 = wrap_for_transformers(
        build_clap_tokenizer(text_encoder.config.text_config.vocab_size),
        build_t5_tokenizer(text_encoder_2.config.vocab_size),
        tok_cfg["clap_model_max_length"], tok_cfg["t5_model_max_length"],
    )
    feature_extractor = ClapFeatureExtractor(**cfg["feature_extractor"])
    scheduler = DDIMScheduler(**cfg["scheduler"])
    return AudioLDM2Pipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        projection_model=projection_model, language_model=language_model,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, feature_extractor=feature_extractor,
        unet=unet, scheduler=scheduler, vocoder=vocoder,
    )


def _tuples(config: dict) -> dict:
    """diffusers' UNet wants tuples where JSON has lists (cross_attention_dim rows in particular)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        out[key] = value
    return out


def _randomize_norms(*modules, seed: int) -> None:
    """Give GroupNorm/LayerNorm affine parameters and the vocoder's mean/scale non-trivial values.

    Fresh modules start with weight 1, bias 0 (and HiFi-GAN with mean 0, scale 1), which would let
    an export that drops or swaps those parameters pass validation.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in modules:
            for sub in module.modules():
                if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and sub.weight is not None:
                    sub.weight.add_(0.1 * torch.randn(sub.weight.shape, generator=gen))
                    sub.bias.add_(0.1 * torch.randn(sub.bias.shape, generator=gen))
            for buf_name in ("mean", "scale"):
                buf = getattr(module, buf_name, None)
                if isinstance(buf, torch.Tensor):
                    buf.add_(0.1 * torch.randn(buf.shape, generator=gen))


def _rescale_vocoder(vocoder, seed: int) -> None:
    """Re-draw HiFi-GAN's convolutions with variance-preserving scales (std = 1/sqrt(fan_in)).

    transformers initialises them with std 0.01, which after a dozen layers leaves random-weight
    audio at ~1e-9: silent, and below fp16's range. Real checkpoints are not touched.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for sub in vocoder.modules():
            if isinstance(sub, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                w = sub.weight
                fan_in = w.shape[1] * w.shape[2] if isinstance(sub, torch.nn.Conv1d) else w.shape[0] * w.shape[2]
                w.copy_(torch.randn(w.shape, generator=gen) / fan_in**0.5)
