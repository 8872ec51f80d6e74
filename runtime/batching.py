"""Micro-batching for servers: concurrent requests that share a ``batch_key`` (latent length, steps,
scheduler, guidance on/off) go through the UNet, VAE and vocoder as one batch.

The text stage runs per request in the caller's thread (so text stages of different requests overlap);
one worker thread owns the denoising batches. Each caller gets exactly its own rows back: a request's
latents come from its own seed, its conditioning rows are its own, and the UNet's T5 padding is masked,
so its audio does not depend on what it was batched with (tests/test_serving.py checks this).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from .errors import BackendError, QueueFullError, RequestCancelled

log = logging.getLogger("audioldm2_trt.runtime")


class MicroBatcher:
    """Wraps one ``AudioLDM2Runtime``; thread-safe.

    max_batch: most waveform rows per UNet batch (CFG doubles the UNet's batch); max_wait_s: how long
    the worker waits for companions after the first request of a batch arrives; max_gather_s: how long,
    at most, it waits instead for requests already submitted and still in their text stage (they arrive
    within one text stage; starting without them leaves the batch part-empty for a whole denoising loop:
    on an H100 replica at 4 and 8 closed-loop clients, batches went from 2 and 4 rows to 4 and 8 with it,
    docs/benchmarks.md); max_queue: most requests waiting or running before ``submit`` raises QueueFullError.
    """

    def __init__(self, runtime, max_batch: int = 8, max_wait_s: float = 0.01, max_queue: int = 64,
                 max_gather_s: float = 0.25):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0 or max_gather_s < 0:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be ≥ 1, max_wait_s={max_wait_s} "
                             f"and max_gather_s={max_gather_s} ≥ 0")
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_gather_s = max_gather_s
        self.max_queue = max_queue
        self._pending: deque = deque()  # (Prepared, Future)
        self._cond = threading.Condition()
        self._admitted = 0  # requests submitted and not yet finished
        self._closed = False
        self.batches_run = 0
        self.rows_run = 0
        self.busy_s = 0.0  # the worker's seconds inside run_batch (denoise + decode)
        self.prepare_s = 0.0  # callers' seconds in the text stage, summed over requests
        self._worker = threading.Thread(target=self._loop, name="audioldm2-batcher", daemon=True)
        self._worker.start()

    # -- callers ------------------------------------------------------------------------------------
    def submit(self, prompt, cancel: threading.Event | None = None, **kwargs) -> Future:
        """Check and encode the request here, then queue it. kwargs: as ``AudioLDM2Runtime.__call__``.
        Raises InvalidRequestError at once for a bad request and QueueFullError when full."""
        with self._cond:
            if self._closed:
                raise BackendError("the batcher is closed")
            if self._admitted >= self.max_queue:
                raise QueueFullError(f"{self._admitted} requests queued or running; the limit is {self.max_queue}")
            self._admitted += 1
        start = time.perf_counter()
        try:
            item = self.runtime.prepare(prompt, cancel=cancel, **kwargs)
        except BaseException:
            self._release(1)
            raise
        finally:
            with self._cond:
                self.prepare_s += time.perf_counter() - start
        future: Future = Future()
        with self._cond:
            self._pending.append((item, future))
            self._cond.notify()
        return future

    def generate(self, prompt, timeout: float | None = None, **kwargs):
        """Submit and wait. On timeout the request is cancelled (its rows leave the batch at the next
        step) and TimeoutError is raised."""
        cancel = threading.Event()
        future = self.submit(prompt, cancel=cancel, **kwargs)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            cancel.set()
            raise TimeoutError(f"request not finished within {timeout} s; cancelled") from None

    def __enter__(self) -> "MicroBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker; requests still queued fail with BackendError, later ``submit`` calls raise it. The
        runtime stays open (it is the caller's). ``with MicroBatcher(rt) as batcher:`` closes on leaving."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join()
        while self._pending:
            _, future = self._pending.popleft()
            future.set_exception(BackendError("the batcher was closed before this request ran"))

    @property
    def queued(self) -> int:
        with self._cond:
            return self._admitted

    def stats(self) -> dict:
        """Counters since start: batches and rows run, the worker's busy seconds, the text stage's seconds."""
        with self._cond:
            return {"queued": self._admitted, "batches_run": self.batches_run, "rows_run": self.rows_run,
                    "busy_s": self.busy_s, "prepare_s": self.prepare_s}

    # -- worker -------------------------------------------------------------------------------------
    def _release(self, n: int) -> None:
        with self._cond:
            self._admitted -= n
            self._cond.notify_all()  # a batch being gathered stops waiting for a request that failed its text stage

    def _take_batch(self) -> list:
        """The oldest pending request and others of its key up to max_batch rows: those pending within
        ``max_wait_s``, or within ``max_gather_s`` while some submitted request is still in its text stage."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            first = self._pending.popleft()
            batch, rows = [first], len(first[0].latents)
            key = first[0].batch_key
            start = time.monotonic()
            deadline, gather_deadline = start + self.max_wait_s, start + self.max_gather_s
            while rows < self.max_batch:
                match = next((p for p in self._pending if p[0].batch_key == key
                              and rows + len(p[0].latents) <= self.max_batch), None)
                if match is not None:
                    self._pending.remove(match)
                    batch.append(match)
                    rows += len(match[0].latents)
                    continue
                # admitted = in the text stage + pending + this batch (the previous batch was released)
                preparing = self._admitted - len(self._pending) - len(batch)
                left = (gather_deadline if preparing > 0 else deadline) - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            start = time.perf_counter()
            try:
                results = self.runtime.run_batch([item for item, _ in live]) if live else []
            except Exception as err:  # a backend failure fails this batch, never the worker
                log.exception("batch of %d failed", len(live))
                results = [err] * len(live)
            with self._cond:
                self.busy_s += time.perf_counter() - start
                self.batches_run += 1
                self.rows_run += sum(len(item.latents) for item, _ in live)
            for (_, future), result in zip(live, results):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            self._release(len(batch))


__all__ = ["MicroBatcher", "QueueFullError", "RequestCancelled"]
