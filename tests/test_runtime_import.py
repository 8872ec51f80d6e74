"""The runtime never imports torch, diffusers or transformers: not at import, not while generating."""

from __future__ import annotations

import inspect
import subprocess
import sys

from .conftest import needs_export

HEAVY = ("torch", "diffusers", "transformers")


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_import_is_torch_free():
    out = _run("import sys, audioldm2_trt.runtime as r; r.AudioLDM2Runtime; "
               f"print([m for m in {HEAVY!r} if m in sys.modules])")
    assert out == "[]"


@needs_export
def test_generation_is_torch_free(tiny_artifacts):
    code = (
        "import sys\n"
        "from audioldm2_trt.runtime import AudioLDM2Runtime\n"
        f"rt = AudioLDM2Runtime.load({str(tiny_artifacts)!r})\n"
        "out = rt(['thunder', 'a dog barking'], num_inference_steps=2, audio_length_in_s=0.5, "
        "num_waveforms_per_prompt=2, seed=1)\n"
        f"print(out.audios.shape, [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    assert _run(code) == "(4, 8000) []"


def test_keyword_names_stay_those_of_diffusers():
    """Users switch from diffusers by keeping their keyword arguments."""
    from audioldm2_trt.runtime.pipeline import AudioLDM2Runtime

    ours = set(inspect.signature(AudioLDM2Runtime.__call__).parameters) - {"self"}
    shared = {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "audio_length_in_s",
              "num_waveforms_per_prompt", "latents"}
    assert shared <= ours
    try:
        from diffusers import AudioLDM2Pipeline
    except ImportError:
        return
    assert shared <= set(inspect.signature(AudioLDM2Pipeline.__call__).parameters)
