"""One-time export stage: AudioLDM 2 (diffusers) → ONNX artefact folder. Needs the `export` extra."""
