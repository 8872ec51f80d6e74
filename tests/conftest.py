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


class CpuStream:
    """What the loop's CUDA stream is to a CPU session: work is done when the call that queues it returns, so recording
    and waiting have nothing to do. Given to the UNet and the solver step, it turns on the steps queued one ahead
    (``DeviceStepper``: a step's flags read after the next step is queued) on the CPU, where its bookkeeping — the
    step dropped when the loop stops, the state it leaves — can be checked against the host loop; given to GPT-2 and
    the append graph, GPT-2's passes waited for once, after an event (``LmLoop``)."""

    def __init__(self):
        self.recorded = self.waited = 0

    def event(self):
        return object()

    def record(self, event):
        self.recorded += 1

    def wait(self, event):
        self.waited += 1

    def synchronize(self):
        pass


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
