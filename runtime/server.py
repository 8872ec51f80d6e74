"""Reference HTTP server: FastAPI over a ``MicroBatcher``. Needs the ``serve`` extra (fastapi, uvicorn).

    POST /v1/generate   JSON body (GenerateBody) → audio/wav (PCM16), or JSON {seed, sample_rate, audio_base64}
    GET  /health        200 with the runtime's health while the process is up
    GET  /ready         200 once warmed up, 503 before
    GET  /openapi.json  the schema (FastAPI)

Errors: a bad field → 422 naming it; a full queue → 429; past ``timeout`` → 504 (the request is
cancelled between denoising steps); a backend failure → 500 with its message. Handlers are plain
functions run in FastAPI's thread pool; the batcher keeps requests apart.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Literal, Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .audio import to_pcm16, wav_bytes
from .batching import MicroBatcher
from .errors import InvalidRequestError, NonFiniteError, QueueFullError, RequestCancelled
from .shapes import WARM_T5_BUCKETS, batch_buckets

log = logging.getLogger("audioldm2_trt.server")

MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for, on top of the runtime's own checks."""

    max_seconds: float = 30.0
    max_steps: int = 200
    max_waveforms: int = 4
    timeout_s: float = 120.0


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to generate")
    negative_prompt: Optional[str] = Field(default=None, max_length=MAX_PROMPT_CHARS)
    seconds: Optional[float] = Field(default=None, gt=0, description="audio length; default the model's (10.24 s)")
    steps: int = Field(default=20, ge=1)
    guidance: float = Field(default=3.5, ge=0, le=30)
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    waveforms: int = Field(default=1, ge=1)
    scheduler: Literal["dpmsolver++", "ddim"] = "dpmsolver++"
    format: Literal["wav", "json"] = "wav"


def _error(status: int, field: str | None, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": [{"loc": ["body", field] if field else [], "msg": message}]})


def create_app(batcher: MicroBatcher, limits: ServerLimits = ServerLimits(),
               warmup: dict | None = None) -> FastAPI:
    """The FastAPI app. ``warmup``: keyword arguments for ``runtime.warmup`` run in a background thread at
    start-up (``/ready`` turns 200 when it is done); None = ready at once."""
    runtime = batcher.runtime
    state = {"ready": warmup is None, "warmup_error": None}

    def do_warmup():
        try:
            runtime.warmup(**warmup)
            state["ready"] = True
        except Exception as err:  # reported by /ready and /health
            log.exception("warm-up failed")
            state["warmup_error"] = str(err)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if warmup is not None:
            threading.Thread(target=do_warmup, daemon=True).start()
        yield

    app = FastAPI(title="AudioLDM 2 runtime", version="1", lifespan=lifespan)

    @app.get("/health")
    def health():
        return {**runtime.health(), "ready": state["ready"], "warmup_error": state["warmup_error"],
                **batcher.stats()}

    @app.get("/ready")
    def ready():
        if state["ready"]:
            return {"ready": True}
        return JSONResponse(status_code=503, content={"ready": False, "warmup_error": state["warmup_error"]})

    @app.post("/v1/generate", responses={200: {"content": {"audio/wav": {}}}})
    def generate(body: GenerateBody):
        for field, value, hi in (("seconds", body.seconds, limits.max_seconds), ("steps", body.steps, limits.max_steps),
                                 ("waveforms", body.waveforms, limits.max_waveforms)):
            if value is not None and value > hi:
                return _error(422, field, f"{field}={value} is above this server's limit {hi}")
        try:
            out = batcher.generate(body.prompt, timeout=limits.timeout_s, negative_prompt=body.negative_prompt,
                                   num_inference_steps=body.steps, guidance_scale=body.guidance,
                                   audio_length_in_s=body.seconds, num_waveforms_per_prompt=body.waveforms,
                                   seed=body.seed, scheduler=body.scheduler)
        except InvalidRequestError as err:
            return _error(422, None, str(err))
        except QueueFullError as err:
            return _error(429, None, str(err))
        except TimeoutError as err:
            return _error(504, None, str(err))
        except (RequestCancelled, NonFiniteError) as err:
            return _error(500, None, str(err))
        pcm = to_pcm16(out.audios)
        if body.format == "wav":  # the best waveform (rank 0); ask for json to get all of them
            return Response(wav_bytes(pcm[0], out.sample_rate), media_type="audio/wav",
                            headers={"X-Seed": str(out.seed)})
        return {"seed": out.seed, "sample_rate": out.sample_rate,
                "scores": None if out.scores is None else [float(s) for s in out.scores],
                "audio_base64": [base64.b64encode(wav_bytes(row, out.sample_rate)).decode() for row in pcm]}

    return app


def serve(artifacts: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", max_batch: int = 8,
          max_queue: int = 64, limits: ServerLimits = ServerLimits(), warmup_seconds: float | None = None,
          ranking: bool = True, shared_arena=None, backend: str = "ort") -> None:
    """Load, warm up in the background, and serve until interrupted (``audioldm2-trt serve``). ``ranking=False``:
    CLAP's audio branch is not loaded, and ``limits.max_waveforms`` must be 1. ``shared_arena``: which components
    share one ONNX Runtime arena (``AudioLDM2Runtime.load``'s: None = on CUDA the decode stage's). ``backend``:
    ``AudioLDM2Runtime.load``'s (``backends.BACKENDS``)."""
    import uvicorn

    from .pipeline import AudioLDM2Runtime

    if not ranking and limits.max_waveforms != 1:
        raise ValueError(f"ranking=False serves one waveform per request; limits.max_waveforms is {limits.max_waveforms}")
    runtime = AudioLDM2Runtime.load(artifacts, device=device, ranking=ranking, shared_arena=shared_arena,
                                    backend=backend)
    batcher = MicroBatcher(runtime, max_batch=max_batch, max_queue=max_queue)
    # every batch bucket the micro-batcher can produce (shapes.batch_buckets) and the usual T5 buckets, before traffic
    warmup = {"lengths_s": (warmup_seconds,), "batch_sizes": batch_buckets(max_batch), "t5_buckets": WARM_T5_BUCKETS}
    app = create_app(batcher, limits, warmup=warmup)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        batcher.close()
        runtime.close()
