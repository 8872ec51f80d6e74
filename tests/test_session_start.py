"""``OrtSession.start``: a run begun on the session's worker (as on CUDA), so that the text stage can run CLAP while T5
runs; the same outputs as ``run``, the session held until the run ends, errors named as ``run`` names them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from audioldm2_trt.runtime.errors import BackendError

from .conftest import needs_export


@pytest.fixture
def clap_session(tiny_artifacts):
    from audioldm2_trt.runtime.backends.ort import OrtSessionFactory

    session = OrtSessionFactory("cpu", bind=True).create("clap_text", Path(tiny_artifacts) / "clap_text.onnx")
    session._worker = ThreadPoolExecutor(max_workers=1)  # what a CUDA session runs on: its own worker thread
    yield session
    session.close()


def _feeds(rows: int = 2, length: int = 7) -> dict:
    ids = np.arange(rows * length, dtype=np.int64).reshape(rows, length) % 50 + 3
    return {"input_ids": ids, "attention_mask": np.ones((rows, length), np.int64)}


@needs_export
def test_started_run_holds_the_session_until_it_ends_and_gives_runs_outputs(clap_session):
    gate = threading.Event()
    clap_session._worker.submit(gate.wait)  # the worker busy: the started run is still pending
    result = clap_session.start(_feeds())
    assert not clap_session.held().acquire(blocking=False)  # held for the pending run
    gate.set()
    started = result()["text_embeds"]
    assert clap_session.held().acquire(timeout=10)  # released once the run ended
    clap_session.held().release()
    np.testing.assert_array_equal(started, clap_session.run(_feeds())["text_embeds"])


@needs_export
def test_started_run_failure_names_the_component_and_frees_the_session(clap_session):
    bad = {"input_ids": np.zeros((2, 7), np.float32), "attention_mask": np.ones((2, 7), np.int64)}
    result = clap_session.start(bad)
    with pytest.raises(BackendError, match=r"clap_text failed on inputs .*input_ids.*float32"):
        result()
    assert clap_session.held().acquire(timeout=10)
    clap_session.held().release()
    assert clap_session.run(_feeds())["text_embeds"].shape[0] == 2  # usable again
