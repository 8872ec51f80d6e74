"""Shared fixtures: one tiny random pipeline and its export per test session (about 15 s on 2 cores)."""

from __future__ import annotations

import importlib.util

import pytest


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_export = pytest.mark.skipif(
    not (_has("torch") and _has("diffusers") and _has("transformers")),
    reason="needs the export extra (torch, diffusers, transformers): pip install -e '.[export,test]'",
)


@pytest.fixture(scope="session")
def tiny_pipe():
    if not (_has("torch") and _has("diffusers")):
        pytest.skip("needs the export extra (torch, diffusers, transformers)")
    from audioldm2_trt.export.sources import Source, load_pipeline

    return load_pipeline(Source(random_config="tiny"))


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_pipe, tmp_path_factory):
    from audioldm2_trt.export.onnx_export import export
    from audioldm2_trt.export.sources import Source

    return export(Source(random_config="tiny"), tmp_path_factory.mktemp("art") / "tiny", pipe=tiny_pipe)


@pytest.fixture(scope="session")
def runtime(tiny_artifacts):
    from audioldm2_trt.runtime import AudioLDM2Runtime

    return AudioLDM2Runtime.load(tiny_artifacts, device="cpu")
