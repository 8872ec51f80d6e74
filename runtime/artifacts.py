"""The artefact folder: its manifest schema, and reading + verifying it.

The export stage writes ``manifest.json`` with these names; the runtime reads them. Layout::

    DIR/manifest.json            format version, source, versions, constants, per-component entries
    DIR/<component>.onnx         one per component in COMPONENTS (+ <component>.onnx.data if > 2 GB)
    DIR/unet_context.onnx        the fused UNet's text-only work, run once per request (its entry's "context")
    DIR/tokenizer_clap.json      tokenizers-library files of the CLAP (RoBERTa) and Flan-T5 tokenizers
    DIR/tokenizer_t5.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError

# Bump when a component's contract (names, shapes, meaning) changes. 2 (2026-11-27): clap_features takes the vocoder's
# audio and resamples it itself (format 1 took CLAP-rate rows fitted on the host, and could be absent). 3 (2026-11-27):
# a component entry may have a "context" graph (the fused UNet's: export/hoist_context.py), whose outputs its graph
# reads in place of some of the component's inputs; a runtime that reads format 2 only would feed it the wrong inputs.
FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)  # format 2 is format 3 without context graphs
MANIFEST = "manifest.json"
TOKENIZER_FILES = {"clap": "tokenizer_clap.json", "t5": "tokenizer_t5.json"}
GPT2_GRAPHS = ("step", "unrolled")  # export/components.py GPT2_GRAPHS
# Every component an export writes, in data-flow order.
COMPONENTS = ("clap_text", "t5_encoder", "projection", "gpt2", "unet", "vae_decoder", "vocoder", "clap_features",
              "clap_audio")
RANKING_COMPONENTS = ("clap_features", "clap_audio")  # run only to rank several waveforms per prompt


def rebuild_hint(folder: Path | str, source: dict | None = None) -> str:
    src = "--model <hub id or folder>"
    if source and source.get("kind") == "random":
        src = f"--random-weights {source.get('config')}"
    elif source and source.get("model"):
        src = f"--model {source['model']}"
    return f"audioldm2-trt export {src} --out {folder} --overwrite"


@dataclass(frozen=True)
class Artifacts:
    """A verified artefact folder. ``constants`` holds the pipeline numbers the runtime needs."""

    folder: Path
    manifest: dict

    @property
    def constants(self) -> dict:
        return self.manifest["constants"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def gpt2_graph(self) -> str:
        return gpt2_graph_of(self.manifest)

    def check_device(self, device_kind: str, hint: str = "load them with device='cuda'") -> None:
        """fp16 artefacts hold CUDA-only kernels: refuse any other device up front, naming what to do."""
        if self.precision not in ("fp32", "fp16"):
            raise ArtifactError(f"{self.folder}: precision {self.precision!r} is not one of fp32, fp16")
        if self.precision == "fp16" and device_kind != "cuda":
            raise ArtifactError(f"{self.folder}: fp16 artefacts use CUDA-only fused kernels; {hint}")

    @property
    def components(self) -> tuple[str, ...]:
        return components_of(self.manifest)

    @property
    def disabled_optimizers(self) -> dict[str, tuple[str, ...]]:
        """Component → the ONNX Runtime graph rewrites its session must not apply, as its entry records them (a
        vocoder exported with its convolution biases as Add nodes: export/conv_bias.py)."""
        out = {}
        for name, entry in self.manifest["components"].items():
            rules = entry.get("disabled_optimizers") or ()
            if not (isinstance(rules, (list, tuple)) and all(isinstance(r, str) and r for r in rules)):
                raise ArtifactError(f"{self.folder}: {name}'s disabled_optimizers must be a list of rewrite names, "
                                    f"got {rules!r}; {rebuild_hint(self.folder, self.manifest.get('source'))}")
            if rules:
                out[name] = tuple(rules)
        return out

    def length_multiple(self, name: str) -> int:
        """The multiple component ``name``'s token rows are padded to (its entry's "length_multiple"; 1 without one:
        the rows as long as the longest prompt)."""
        value = self.manifest["components"][name].get("length_multiple", 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArtifactError(f"{self.folder}: {name}'s length_multiple must be an integer ≥ 1, got {value!r}; "
                                f"{rebuild_hint(self.folder, self.manifest.get('source'))}")
        return value

    @property
    def nhwc_components(self) -> frozenset[str]:
        """Components whose fp16 recipe fused NHWC convolutions (NhwcConv): ONNX Runtime learns that their weights
        are NHWC already only while prepacking, so their sessions cannot pack weights (``backends.ort``)."""
        return frozenset(name for name, entry in self.manifest["components"].items()
                         if ((entry.get("fp16") or {}).get("fused") or {}).get("NhwcConv"))

    def component_file(self, name: str) -> Path:
        return self.folder / self.manifest["components"][name]["file"]

    def context(self, name: str) -> dict | None:
        """Component ``name``'s context graph (export/hoist_context.py), or None: {"file", "inputs" (its inputs, some
        of the component's), "outputs" (what the component's graph reads from it), "step_inputs" (the component
        graph's inputs, in order), …}."""
        return self.manifest["components"][name].get("context")

    def context_file(self, name: str) -> Path:
        return self.folder / self.manifest["components"][name]["context"]["file"]

    def session_files(self, names) -> dict[str, Path]:
        """{session name: ONNX file} of the components ``names``: each one's file, and its context graph's as
        ``<name>_context`` where it has one (the UNet's "unet_context")."""
        files = {}
        for name in names:
            files[name] = self.component_file(name)
            if self.context(name):
                files[f"{name}_context"] = self.context_file(name)
        return files

    def tokenizer_file(self, which: str) -> Path:
        return self.folder / self.manifest["tokenizers"][which]["file"]


def components_of(manifest: dict) -> tuple[str, ...]:
    """The components an artefact manifest holds, in ``COMPONENTS`` order."""
    return tuple(n for n in COMPONENTS if n in manifest["components"])


def gpt2_graph_of(manifest: dict) -> str:
    """"step" (one GPT-2 pass, run once per generated state) or "unrolled" (all steps in one call); artefacts
    from before the step graph carry no "graph" and are unrolled."""
    return manifest["components"]["gpt2"].get("graph", "unrolled")


def load_artifacts(folder: str | Path) -> Artifacts:
    """Read ``manifest.json`` and check that every file it names is there.

    Raises ArtifactError naming the folder, the problem and the command that rebuilds it.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"artefact folder {str(folder)!r} does not exist; build one with: {rebuild_hint(folder)}")
    if not path.is_file():
        raise ArtifactError(
            f"{str(folder)!r} has no {MANIFEST}: not an artefact folder, or an interrupted export; "
            f"rebuild with: {rebuild_hint(folder)}"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); rebuild with: {rebuild_hint(folder)}") from err
    version = manifest.get("format_version")
    if version not in READABLE_FORMATS:
        raise ArtifactError(
            f"{str(folder)!r} was exported with artefact format {version!r}, this runtime reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}; rebuild with: {rebuild_hint(folder, manifest.get('source'))}"
        )
    art = Artifacts(folder=folder, manifest=manifest)
    missing = [n for n in COMPONENTS if n not in manifest.get("components", {})]
    missing += [
        str(f.relative_to(folder)) for f in _listed_files(art) if not f.is_file()
    ]
    if missing:
        raise ArtifactError(
            f"{str(folder)!r} is missing {', '.join(missing)}; rebuild with: "
            f"{rebuild_hint(folder, manifest.get('source'))}"
        )
    if art.gpt2_graph not in GPT2_GRAPHS:
        raise ArtifactError(f"{str(folder)!r}: gpt2 graph {art.gpt2_graph!r} is not one of {', '.join(GPT2_GRAPHS)}; "
                            f"rebuild with: {rebuild_hint(folder, manifest.get('source'))}")
    return art


def _listed_files(art: Artifacts) -> list[Path]:
    files = [art.tokenizer_file(w) for w in TOKENIZER_FILES]
    for name, entry in art.manifest["components"].items():
        files.append(art.folder / entry["file"])
        if entry.get("context"):
            files.append(art.folder / entry["context"]["file"])
        if entry.get("external_data"):
            files.append(art.folder / entry["external_data"])
    return files
