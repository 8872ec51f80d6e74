"""Keeping CUDA graph capture alone in the process.

ONNX Runtime captures a CUDA graph with ``cudaStreamBeginCapture(..., cudaStreamCaptureModeGlobal)``. While
any thread of the process captures in that mode, a "potentially unsafe" CUDA call from *any other* thread
(``cudaMalloc``, ``cudaMemcpy``, ``cudaStreamSynchronize``, a cuBLAS call that allocates) fails, and the
capture fails with it ("operation not permitted when stream is capturing", then "operation failed due to a
previous error during capture"). Seen on the H100 (docs/benchmarks.md): two runtimes driven from two threads,
and one runtime under concurrent requests, each time a new shape was captured while another component ran.

So every CUDA run of this backend holds ``CUDA_CAPTURE_GUARD``: shared for ordinary runs (any number at once),
exclusive for a run that may capture (the first runs of a new shape key). This state is per process on
purpose: the driver's capture mode is per process too, for every GPU of it. CUDA work outside this package
(torch in the same server, say) is not covered; capture happens only in the first runs of each shape key, which
``AudioLDM2Runtime.warmup`` does before serving.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class CaptureGuard:
    """A readers–writer lock that prefers the writer: once an exclusive holder waits, new shared holders wait
    behind it, so a capture is never starved by a stream of ordinary runs."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def shared(self):
        with self._cond:
            while self._exclusive or self._waiting_exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting_exclusive += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


CUDA_CAPTURE_GUARD = CaptureGuard()
