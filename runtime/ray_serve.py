"""Scale-out on Ray Serve: one replica per GPU (or per CPU slot), each an ``AudioLDM2Runtime`` with its own
``MicroBatcher``. Needs the ``ray`` extra (``ray[serve]``).

Batching happens inside each replica (the runtime's batcher groups requests by batch key, which Ray
Serve's ``@serve.batch`` cannot: it batches any requests together). Ray Serve routes requests to
replicas and bounds each replica's in-flight requests with ``max_ongoing_requests`` — by default
``max_batch``: a replica then holds at most one batch, further requests wait in Ray's router and go to
whichever replica frees slots first. With a larger bound the router spread the requests released by one
replica's batch over both replicas of a two-GPU host, and each ran half-full batches (docs/benchmarks.md).

    from audioldm2_trt.runtime.ray_serve import build_app
    from ray import serve
    handle = serve.run(build_app("engines/full-fp16", num_replicas=2, device="cuda"))
    result = handle.generate.remote({"prompt": "rain on a tin roof", "seed": 1}).result()

On a GPU host each replica is given one GPU (``num_gpus=1``); Ray sets CUDA_VISIBLE_DEVICES, so inside
the replica that GPU is ``cuda:0``. Across hosts: ``ray start --head`` on one, ``ray start --address=…``
on the others, then the same ``serve.run`` with ``num_replicas`` = the number of GPUs.
"""

from __future__ import annotations

import asyncio
import base64
import os

from ray import serve

from .audio import to_pcm16
from .backends import check_backend
from .errors import InvalidRequestError


@serve.deployment
class AudioLDM2Deployment:
    """``generate(body)``: body as the HTTP server's GenerateBody (a dict) → {seed, sample_rate, scores,
    audio_pcm16_base64 (list, best first)}. HTTP (``POST /``) takes the same JSON."""

    def __init__(self, artifacts: str, device: str = "cpu", max_batch: int = 8, max_queue: int = 64,
                 warmup: bool = True, threads: int = 0, ranking: bool = True, backend: str = "ort"):
        from .batching import MicroBatcher
        from .pipeline import AudioLDM2Runtime
        from .shapes import WARM_T5_BUCKETS, batch_buckets

        # ranking=False: one waveform per request, CLAP's audio branch not loaded (AudioLDM2Runtime.load)
        self.runtime = AudioLDM2Runtime.load(artifacts, device=device, threads=threads, ranking=ranking,
                                             backend=backend)
        if warmup:  # every batch bucket the micro-batcher can produce, before the replica takes traffic
            self.runtime.warmup(batch_sizes=batch_buckets(max_batch), t5_buckets=WARM_T5_BUCKETS)
        self.batcher = MicroBatcher(self.runtime, max_batch=max_batch, max_queue=max_queue)

    async def generate(self, body: dict) -> dict:
        from pydantic import ValidationError

        from .server import GenerateBody

        try:
            req = GenerateBody(**body)
        except ValidationError as err:
            raise InvalidRequestError(str(err)) from None
        kwargs = dict(negative_prompt=req.negative_prompt, num_inference_steps=req.steps, guidance_scale=req.guidance,
                      audio_length_in_s=req.seconds, num_waveforms_per_prompt=req.waveforms, seed=req.seed,
                      scheduler=req.scheduler)
        # The text stage runs in a worker thread; the denoising batch in the batcher's thread.
        future = await asyncio.to_thread(self.batcher.submit, req.prompt, **kwargs)
        out = await asyncio.wrap_future(future)
        return {"seed": out.seed, "sample_rate": out.sample_rate,
                "scores": None if out.scores is None else [float(s) for s in out.scores],
                "audio_pcm16_base64": [base64.b64encode(row.tobytes()).decode() for row in to_pcm16(out.audios)]}

    async def __call__(self, request) -> dict:
        return await self.generate(await request.json())

    def health(self) -> dict:
        """The runtime's health, the batcher's counters, and which replica answered (pid, its GPUs)."""
        return {**self.runtime.health(), **self.batcher.stats(), "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def build_app(artifacts: str, num_replicas: int = 1, device: str = "cpu", max_batch: int = 8,
              cpus_per_replica: float = 1.0, warmup: bool = True, threads: int = 0,
              max_ongoing_requests: int | None = None, ranking: bool = True, backend: str = "ort"):
    """The bound application: ``num_replicas`` replicas, each with one GPU when ``device`` is CUDA, each
    holding at most ``max_ongoing_requests`` requests (default ``max_batch``: one batch's worth). ``ranking=False``:
    one waveform per request, CLAP's audio branch not loaded. ``backend``: ``AudioLDM2Runtime.load``'s, for every
    replica (``backends.BACKENDS``; checked here, before any replica starts)."""
    max_ongoing_requests = max_batch if max_ongoing_requests is None else max_ongoing_requests
    if max_batch < 1 or max_ongoing_requests < 1:
        raise InvalidRequestError(f"max_batch={max_batch} and max_ongoing_requests={max_ongoing_requests} must be ≥ 1")
    gpus = 1 if check_backend(backend, device).kind == "cuda" else 0
    if gpus and device not in ("cuda", "cuda:0"):
        raise InvalidRequestError(f"device {device!r}: under Ray each replica sees its own GPU as cuda:0; "
                                  "pass device='cuda'")
    return AudioLDM2Deployment.options(
        num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_gpus": gpus, "num_cpus": cpus_per_replica},
    ).bind(artifacts, device=device, max_batch=max_batch, warmup=warmup, threads=threads, ranking=ranking,
           backend=backend)
