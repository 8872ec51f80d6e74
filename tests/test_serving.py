"""Serving: batch invariance, the micro-batcher under threads, cancellation, the HTTP server on loopback,
and Ray Serve with two CPU replicas. Everything on the tiny CPU artefacts, bounded in count and time."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from .conftest import _has

FAST = dict(num_inference_steps=3, audio_length_in_s=2.0)
CASES = [("a dog barks", 1, 3.5), ("rain falling on a metal roof in a storm at night, thunder far away", 2, 2.0),
         ("x", 3, 3.5), ("a violin", 4, 1.0), ("footsteps on gravel", 5, 5.0)]


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def singles(runtime):
    """The reference: each (prompt, seed, guidance) run alone through ``__call__``."""
    return {c: runtime(c[0], seed=c[1], guidance_scale=c[2], **FAST).audios for c in CASES}


@pytest.fixture(scope="module", params=["host loop", "device loop"])
def loop_runtime(request, runtime, tiny_artifacts):
    """The runtime with the denoising loop on the host (the CPU default) and kept in bound buffers
    (``device_loop=True``, CUDA's default), both checked against the host loop's single runs."""
    if request.param == "host loop":
        return runtime
    from audioldm2_trt.runtime import AudioLDM2Runtime

    return AudioLDM2Runtime.load(tiny_artifacts, device="cpu", device_loop=True)


def test_batch_invariance_across_prompt_lengths_and_guidance(loop_runtime, singles):
    runtime = loop_runtime
    cfg = [c for c in CASES if c[2] > 1.0]  # one batch key: guidance on
    items = [runtime.prepare(p, seed=s, guidance_scale=g, **FAST) for p, s, g in cfg]
    assert len({it.cond.t5.shape[1] for it in items}) > 1  # really different T5 lengths in one batch
    results = runtime.run_batch(items)
    for case, result in zip(cfg, results):
        assert np.abs(singles[case]).max() > 1e-3
        assert rel_l2(result.audios, singles[case]) <= 1e-4, case


def test_batch_padded_to_its_bucket_gives_each_request_its_own_result(runtime, singles):
    """Three requests → 3 rows → padded to 4 (UNet batch 8 under CFG); the pad rows never reach a result."""
    from audioldm2_trt.runtime.shapes import batch_bucket, batch_buckets

    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert batch_buckets(8) == batch_buckets(5) == (1, 2, 4, 8) and batch_buckets(1) == (1,)
    cfg = [c for c in CASES if c[2] > 1.0][:3]
    unet, vocoder = runtime._sessions["unet"], runtime._sessions["vocoder"]
    seen = {"unet": [], "vocoder": []}
    for name, session in (("unet", unet), ("vocoder", vocoder)):
        def recording(feeds, _run=session.run, _name=name):
            seen[_name].append(len(next(iter(feeds.values()))))
            return _run(feeds)
        session.run = recording
    try:
        results = runtime.run_batch([runtime.prepare(p, seed=s, guidance_scale=g, **FAST) for p, s, g in cfg])
    finally:
        del unet.run, vocoder.run
    assert set(seen["unet"]) == {8} and seen["vocoder"] == [4]
    for case, result in zip(cfg, results):
        assert result.audios.shape[0] == 1
        assert rel_l2(result.audios, singles[case]) <= 1e-4, case


def test_batch_of_different_keys_is_refused(runtime):
    a = runtime.prepare("a", seed=0, **FAST)
    b = runtime.prepare("b", seed=0, num_inference_steps=4, audio_length_in_s=2.0)
    with pytest.raises(ValueError, match="different batch keys"):
        runtime.run_batch([a, b])


def test_micro_batcher_threads_get_their_own_results(loop_runtime, singles):
    from audioldm2_trt.runtime import MicroBatcher

    runtime = loop_runtime
    batcher = MicroBatcher(runtime, max_batch=8, max_wait_s=0.05)
    results, errors = {}, []

    def client(i):
        try:
            for j in range(4):
                case = CASES[(i + j) % len(CASES)]
                results[(i, j)] = (case, batcher.generate(case[0], seed=case[1], guidance_scale=case[2], **FAST).audios)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    batcher.close()
    assert not errors, errors
    assert len(results) == 24
    for case, audio in results.values():
        assert rel_l2(audio, singles[case]) <= 1e-4, case
    assert batcher.batches_run < 24  # requests really shared batches
    stats = batcher.stats()
    assert stats["rows_run"] == 24 and stats["batches_run"] == batcher.batches_run and stats["queued"] == 0
    assert stats["busy_s"] > 0 and stats["prepare_s"] > 0


class SlowTextStage:
    """The runtime with a text stage that takes ``delay`` s longer for prompts in ``slow``. With ``together``
    callers, each text stage starts only once all of them have entered theirs (so all were admitted by the
    batcher before any is queued, however the threads are scheduled)."""

    def __init__(self, runtime, slow, delay, together=1):
        self.runtime, self.slow, self.delay = runtime, slow, delay
        self._all_in = threading.Barrier(together)

    def prepare(self, prompt, **kwargs):
        self._all_in.wait(timeout=60)
        if prompt in self.slow:
            time.sleep(self.delay)
        return self.runtime.prepare(prompt, **kwargs)

    def run_batch(self, items):
        return self.runtime.run_batch(items)


@pytest.mark.parametrize("gather_s, batches", [(5.0, 1), (0.0, 2)])
def test_batch_waits_for_a_request_still_in_its_text_stage(runtime, singles, gather_s, batches):
    """Two requests admitted together, one 0.3 s slower in its text stage: with max_gather_s 5 s they run as one
    batch (the worker waits for the admitted one), with 0 as two; each gets its own audio either way."""
    from audioldm2_trt.runtime import MicroBatcher

    fast, slow = CASES[0], CASES[2]  # one batch key: same length, steps, guidance on
    # Both text stages start together, and the gather window is generous: CI once ran these two as two batches
    # with max_gather_s 1 s (2-core machine, under load). Either the second thread started only after the first
    # request had been queued, or its text stage outlasted the window; neither can happen now.
    stage = SlowTextStage(runtime, {slow[0]}, 0.3, together=2)
    batcher = MicroBatcher(stage, max_batch=8, max_wait_s=0.01, max_gather_s=gather_s)
    out = {}
    threads = [threading.Thread(target=lambda c=c: out.__setitem__(c, batcher.generate(
        c[0], seed=c[1], guidance_scale=c[2], **FAST).audios)) for c in (fast, slow)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    batcher.close()
    assert batcher.batches_run == batches
    for case in (fast, slow):
        assert rel_l2(out[case], singles[case]) <= 1e-4, case


def test_warmup_prompts_land_in_the_t5_buckets_asked_for(runtime):
    from audioldm2_trt.runtime.errors import InvalidRequestError
    from audioldm2_trt.runtime.shapes import t5_bucket

    for bucket in (16, 32, 48):
        prompt = runtime.prompt_in_t5_bucket(bucket)
        assert t5_bucket(runtime._t5_tok.encode([prompt]).length) == bucket, (bucket, prompt)
    longest = runtime._t5_tok.model_max_length
    with pytest.raises(InvalidRequestError, match=f"{longest + 1} tokens.*1…{longest}"):
        runtime.prompt_in_t5_bucket(longest + 1)


def test_cancel_between_steps_and_timeout(runtime):
    from audioldm2_trt.runtime import MicroBatcher, RequestCancelled

    cancel = threading.Event()
    steps_seen = []

    def on_step(i, n):
        steps_seen.append(i)
        if i == 1:
            cancel.set()

    with pytest.raises(RequestCancelled, match="before denoising step 2 of 5"):
        runtime("a dog", seed=0, num_inference_steps=5, audio_length_in_s=2.0, callback=on_step, cancel=cancel)
    assert steps_seen == [0, 1]

    release = threading.Event()
    batcher = MicroBatcher(runtime, max_batch=1, max_queue=2)
    blocker = batcher.submit("slow", seed=0, callback=lambda i, n: release.wait(10), **FAST)
    with pytest.raises(TimeoutError, match="cancelled"):
        batcher.generate("waits behind the slow one", timeout=0.2, seed=1, **FAST)
    release.set()
    assert blocker.result(30).audios.shape[0] == 1
    ok = batcher.generate("after the timeout", seed=1, timeout=30, **FAST)  # the batcher still works
    assert np.isfinite(ok.audios).all()
    batcher.close()


def test_queue_full(runtime):
    from audioldm2_trt.runtime import MicroBatcher, QueueFullError

    release = threading.Event()
    batcher = MicroBatcher(runtime, max_batch=1, max_queue=1)
    first = batcher.submit("slow", seed=0, callback=lambda i, n: release.wait(10), **FAST)
    with pytest.raises(QueueFullError, match="limit is 1"):
        batcher.submit("one too many", seed=1, **FAST)
    release.set()
    first.result(30)
    batcher.close()


@pytest.mark.parametrize("kwargs, named", [({"max_batch": 0}, "max_batch=0"), ({"max_queue": 0}, "max_queue=0"),
                                           ({"max_wait_s": -1}, "max_wait_s=-1"),
                                           ({"max_gather_s": -0.5}, "max_gather_s=-0.5")])
def test_batcher_settings_out_of_range_are_named(runtime, kwargs, named):
    from audioldm2_trt.runtime import MicroBatcher

    with pytest.raises(ValueError, match=named):
        MicroBatcher(runtime, **kwargs)


# -- HTTP ------------------------------------------------------------------------------------------
needs_server = pytest.mark.skipif(not (_has("fastapi") and _has("uvicorn")),
                                  reason="needs the serve extra: pip install -e '.[serve]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runtime):
    if not (_has("fastapi") and _has("uvicorn")):
        pytest.skip("needs the serve extra: pip install -e '.[serve]'")
    import uvicorn

    from audioldm2_trt.runtime import MicroBatcher
    from audioldm2_trt.runtime.server import ServerLimits, create_app

    batcher = MicroBatcher(runtime, max_batch=8, max_queue=64)
    app = create_app(batcher, ServerLimits(max_seconds=5.0, max_steps=10, max_waveforms=2, timeout_s=60),
                     warmup={"lengths_s": (2.0,), "batch_sizes": (1,)})
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(30)
    assert not thread.is_alive(), "server did not shut down"
    batcher.close()


def _post(url, body: bytes, content_type="application/json"):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _pcm(wav: bytes) -> np.ndarray:
    import soundfile

    data, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    assert rate == 16000
    return data


def _body(case, **extra) -> bytes:
    return json.dumps({"prompt": case[0], "seed": case[1], "guidance": case[2], "steps": 3, "seconds": 2.0,
                       **extra}).encode()


MALFORMED = [
    b"{not json", b"[]", json.dumps({"prompt": 5}).encode(), json.dumps({"prompt": "a", "steps": "many"}).encode(),
    json.dumps({"prompt": "a", "steps": -3}).encode(), json.dumps({"prompt": "a", "seconds": 1e9}).encode(),
    json.dumps({"prompt": "a", "steps": 10**6}).encode(), json.dumps({"prompt": "x" * 1_000_000}).encode(),
    json.dumps({"prompt": ""}).encode(), json.dumps({"prompt": "a", "seed": -1}).encode(),
    json.dumps({"prompt": "a", "waveforms": 50}).encode(), json.dumps({"prompt": "a", "format": "mp3"}).encode(),
    json.dumps({"prompt": "a", "unknown_field": 1}).encode(), json.dumps({"prompt": "a", "seconds": 0.001}).encode(),
]


@needs_server
def test_server_under_concurrent_load_with_malformed_requests(server, runtime, singles):
    from audioldm2_trt.runtime.audio import to_pcm16

    deadline = time.time() + 60
    while _get(server + "/ready")[0] != 200 and time.time() < deadline:
        time.sleep(0.1)
    assert _get(server + "/ready")[0] == 200
    expected = {c: to_pcm16(singles[c])[0] for c in CASES}
    assert all(np.abs(e).max() > 50 for e in expected.values())  # not silent: the comparison can fail
    good, bad, failures = [], [], []

    def client(i):
        for j in range(20):
            if j % 5 == 4:  # a malformed request mixed into the load
                status, _, text = _post(server + "/v1/generate", MALFORMED[(i * 4 + j) % len(MALFORMED)])
                bad.append(status)
                if not 400 <= status < 500:
                    failures.append((status, text[:200]))
                continue
            case = CASES[(i + j) % len(CASES)]
            status, ctype, data = _post(server + "/v1/generate", _body(case))
            if status != 200 or ctype != "audio/wav":
                failures.append((status, data[:200]))
                continue
            got = _pcm(data)
            good.append(case)
            if got.shape != expected[case].shape or np.abs(got.astype(int) - expected[case]).max() > 1:
                failures.append(("mismatch", case))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    assert not failures, failures[:5]
    assert len(good) == 8 * 16 and len(bad) == 8 * 4
    status, body = _get(server + "/health")
    assert status == 200 and json.loads(body)["batches_run"] < len(good)


@needs_server
def test_server_json_format_errors_and_schema(server, singles):
    import base64

    status, _, data = _post(server + "/v1/generate", _body(CASES[0], format="json"))
    assert status == 200
    payload = json.loads(data)
    assert payload["seed"] == CASES[0][1] and payload["sample_rate"] == 16000
    from audioldm2_trt.runtime.audio import to_pcm16

    got = _pcm(base64.b64decode(payload["audio_base64"][0]))
    assert np.abs(got.astype(int) - to_pcm16(singles[CASES[0]])[0]).max() <= 1
    status, _, data = _post(server + "/v1/generate", json.dumps({"prompt": "a", "steps": 11}).encode())
    assert status == 422 and b"steps=11 is above this server's limit 10" in data
    status, _, data = _post(server + "/v1/generate", json.dumps({"prompt": "a", "steps": 3, "seconds": 0.001}).encode())
    assert status == 422 and b"audio_length_in_s=0.001 is outside" in data
    status, schema = _get(server + "/openapi.json")
    assert status == 200 and "/v1/generate" in json.loads(schema)["paths"]


@needs_server
def test_server_queue_full_is_429_and_timeout_is_504(runtime):
    from audioldm2_trt.runtime import MicroBatcher
    from audioldm2_trt.runtime.server import ServerLimits, create_app
    from fastapi.testclient import TestClient

    release = threading.Event()
    batcher = MicroBatcher(runtime, max_batch=1, max_queue=1)
    client = TestClient(create_app(batcher, ServerLimits(timeout_s=0.3)))
    blocker = batcher.submit("slow", seed=0, callback=lambda i, n: release.wait(10), **FAST)
    r = client.post("/v1/generate", json={"prompt": "a", "steps": 3, "seconds": 2.0})
    assert r.status_code == 429 and "limit is 1" in r.text
    batcher.max_queue = 2
    r = client.post("/v1/generate", json={"prompt": "a", "steps": 3, "seconds": 2.0})
    assert r.status_code == 504 and "cancelled" in r.text
    release.set()
    blocker.result(30)
    batcher.close()


@needs_server
def test_server_without_ranking_refuses_several_waveforms(tiny_artifacts):
    """A server over ``load(ranking=False)`` answers one waveform per request and names the limit for more; serve()
    refuses limits that would let a request ask for more."""
    from audioldm2_trt.runtime import AudioLDM2Runtime, MicroBatcher
    from audioldm2_trt.runtime.server import ServerLimits, create_app, serve
    from fastapi.testclient import TestClient

    rt = AudioLDM2Runtime.load(tiny_artifacts, ranking=False)
    batcher = MicroBatcher(rt, max_batch=2)
    client = TestClient(create_app(batcher, ServerLimits(max_waveforms=1)))
    r = client.post("/v1/generate", json={"prompt": "a", "steps": 2, "seconds": 2.0, "waveforms": 2})
    assert r.status_code == 422 and "waveforms=2 is above this server's limit 1" in r.text
    r = client.post("/v1/generate", json={"prompt": "a", "steps": 2, "seconds": 2.0, "seed": 1},
                    headers={"Accept": "audio/wav"})
    assert r.status_code == 200 and r.content[:4] == b"RIFF"
    batcher.close()
    with pytest.raises(ValueError, match="ranking=False serves one waveform per request; limits.max_waveforms is 4"):
        serve(str(tiny_artifacts), ranking=False)


@needs_server
def test_serve_command_passes_shared_arena_and_backend_to_the_runtime(tiny_artifacts, monkeypatch, capsys):
    """``audioldm2-trt serve --shared-arena`` loads the runtime with one arena for every component (health names
    them); ``--shared-arena none`` with none; without the flag, load's default (on the CPU: none). ``--backend``
    goes to load too (health names the backend). uvicorn.run is replaced by a call that checks the app's runtime and
    returns."""
    import uvicorn

    from audioldm2_trt.cli import main
    from audioldm2_trt.runtime import AudioLDM2Runtime

    loaded = []
    original = AudioLDM2Runtime.load.__func__

    def load(cls, *args, **kwargs):
        loaded.append(original(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(AudioLDM2Runtime, "load", classmethod(load))
    healths = []  # read while serving (the runtime is closed after)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: healths.append(loaded[-1].health()))
    for flags, every in ((["--shared-arena"], True), (["--shared-arena", "all"], True),
                         (["--shared-arena", "none"], False), ([], False)):
        assert main(["serve", "--artifacts", str(tiny_artifacts), *flags]) == 0
        health = healths[-1]
        assert health["shared_arena"] == (sorted(health["components"]) if every else []), flags
        assert len(health["components"]) >= 7 and health["backend"] == "ort"
    assert main(["serve", "--artifacts", str(tiny_artifacts), "--shared-arena", "t5_encoder, projection"]) == 0
    assert healths[-1]["shared_arena"] == ["projection", "t5_encoder"]
    # --backend reaches the runtime's load: TensorRT engines run on CUDA only, refused before anything serves
    assert main(["serve", "--artifacts", str(tiny_artifacts), "--backend", "trt"]) == 2
    assert "backend 'trt' runs on CUDA only; got device 'cpu'" in capsys.readouterr().err
    assert len(healths) == 5


# -- Ray Serve ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not _has("ray"), reason="needs the ray extra: pip install -e '.[ray]'")
def test_ray_replica_holds_one_batch_by_default_and_bad_bounds_are_refused(tiny_artifacts):
    from audioldm2_trt.runtime.errors import InvalidRequestError
    from audioldm2_trt.runtime.ray_serve import build_app

    # _bound_deployment: the Deployment behind Ray's Application (its public max_ongoing_requests)
    assert build_app(str(tiny_artifacts), max_batch=4)._bound_deployment.max_ongoing_requests == 4
    assert build_app(str(tiny_artifacts), max_batch=4, max_ongoing_requests=12)._bound_deployment.max_ongoing_requests == 12
    with pytest.raises(InvalidRequestError, match="max_ongoing_requests=0 must be ≥ 1"):
        build_app(str(tiny_artifacts), max_ongoing_requests=0)
    with pytest.raises(InvalidRequestError, match="device 'cuda:1'"):
        build_app(str(tiny_artifacts), device="cuda:1")
    # the backend goes to every replica's load; a wrong one is refused before any replica starts
    trt_app = build_app(str(tiny_artifacts), device="cuda", backend="trt")
    assert trt_app._bound_deployment.init_kwargs["backend"] == "trt"
    with pytest.raises(InvalidRequestError, match="backend 'tensorrt' is not one of ort, ort-trt, trt"):
        build_app(str(tiny_artifacts), backend="tensorrt")
    with pytest.raises(InvalidRequestError, match="backend 'trt' runs on CUDA only; got device 'cpu'"):
        build_app(str(tiny_artifacts), backend="trt")


@pytest.mark.skipif(not _has("ray"), reason="needs the ray extra: pip install -e '.[ray]'")
def test_ray_serve_two_cpu_replicas(tiny_artifacts, singles):
    import base64

    import ray
    from ray import serve

    from audioldm2_trt.runtime.audio import to_pcm16
    from audioldm2_trt.runtime.ray_serve import build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(build_app(str(tiny_artifacts), num_replicas=2, cpus_per_replica=0.5, threads=1),
                           name="audioldm2", route_prefix=None)
        requests = [CASES[i % len(CASES)] for i in range(16)]
        responses = [handle.generate.remote({"prompt": c[0], "seed": c[1], "guidance": c[2], "steps": 3,
                                             "seconds": 2.0}) for c in requests]
        for case, response in zip(requests, responses):
            out = response.result(timeout_s=120)
            got = np.frombuffer(base64.b64decode(out["audio_pcm16_base64"][0]), dtype=np.int16)
            assert out["seed"] == case[1]
            assert np.abs(got.astype(int) - to_pcm16(singles[case])[0]).max() <= 1, case
        with pytest.raises(Exception, match="steps"):
            handle.generate.remote({"prompt": "a", "steps": -1}).result(timeout_s=60)
        # each replica's health names it; the two batchers together ran exactly the 16 requests' rows
        health = {}
        for _ in range(64):  # one call after another: the router picks a replica for each
            h = handle.health.remote().result(timeout_s=60)
            health[h["pid"]] = h
            if len(health) == 2:
                break
        assert len(health) == 2
        assert sum(h["rows_run"] for h in health.values()) == 16
        assert all(h["warm"] and h["queued"] == 0 for h in health.values())
    finally:
        serve.shutdown()
        ray.shutdown()


def test_gpt2_step_graph_runs_eight_passes_over_one_buffer_shape(runtime):
    """The step graph: one GPT-2 pass per generated state, all eight over the same [R, width, D] buffer (width a
    multiple of 16), ``last`` moving one position per pass; so one shape key (one CUDA graph) per request shape."""
    gpt2 = runtime._sessions["gpt2"]
    calls = []

    def recording(feeds, _run=gpt2.run):
        calls.append((feeds["inputs_embeds"].shape, int(feeds["last"][0]), int(feeds["attention_mask"][-1].sum())))
        return _run(feeds)

    gpt2.run = recording
    try:
        runtime("a dog barking", num_inference_steps=2, seed=0)
    finally:
        del gpt2.run
    assert len(calls) == runtime.constants["max_new_tokens"] == 8
    shapes, lasts, attended = zip(*calls)
    assert len(set(shapes)) == 1 and shapes[0][1] % 16 == 0 and shapes[0][0] == 2  # [negative; positive]
    assert list(lasts) == list(range(lasts[0], lasts[0] + 8))
    assert list(attended) == list(range(attended[0], attended[0] + 8))  # each pass attends one more position
