"""Sub-commands of the runtime: ``generate``, ``bench``, ``serve`` and ``demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .backends import BACKENDS
from .bench import BenchRequest
from .schedulers import SCHEDULERS

DEMO_DIR = Path.home() / ".cache" / "audioldm2-trt" / "tiny-random"


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="generate audio from a prompt with an exported artefact folder")
    g.add_argument("prompt")
    g.add_argument("--artifacts", required=True, help="artefact folder written by `audioldm2-trt export`")
    g.add_argument("-o", "--output", default="out.wav", help="WAV file (16-bit PCM); with --waveforms N > 1, "
                   "files are numbered out_0.wav … best first")
    _generation_options(g)
    g.set_defaults(run=run_generate)

    s = sub.add_parser("serve", help="HTTP server (FastAPI + uvicorn; needs the serve extra) over an artefact folder")
    s.add_argument("--artifacts", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    _backend_argument(s)
    s.add_argument("--max-batch", type=int, default=8, help="most waveform rows per UNet batch")
    s.add_argument("--max-queue", type=int, default=64, help="requests queued or running before 429")
    s.add_argument("--max-seconds", type=float, default=30.0, help="longest audio a request may ask for")
    s.add_argument("--max-steps", type=int, default=200)
    s.add_argument("--timeout", type=float, default=120.0, help="seconds before 504 (the request is cancelled)")
    s.add_argument("--no-ranking", action="store_true", help="one waveform per request: CLAP's audio branch is not "
                   "loaded (less GPU memory, shorter load)")
    _shared_arena_argument(s)
    s.set_defaults(run=run_serve)

    b = sub.add_parser("bench", help="latency of an artefact folder on a device: load, first call, warm calls by "
                       "stage (the runtime alone; scripts/benchmark.py adds the diffusers peers)")
    b.add_argument("--artifacts", required=True, help="artefact folder written by `audioldm2-trt export`")
    b.add_argument("--runs", type=int, default=10, help="warm calls timed after the first (default 10)")
    b.add_argument("--prompt", default=BenchRequest.prompt)
    b.add_argument("--negative-prompt", default=BenchRequest.negative_prompt)
    b.add_argument("--steps", type=int, default=BenchRequest.steps)
    b.add_argument("--guidance", type=float, default=BenchRequest.guidance)
    b.add_argument("--seconds", type=float, default=BenchRequest.seconds, help="audio length (default 10.24 s)")
    b.add_argument("--waveforms", type=int, default=BenchRequest.waveforms, help="waveforms per prompt, ranked by CLAP")
    b.add_argument("--scheduler", default=BenchRequest.scheduler, choices=SCHEDULERS)
    b.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    _backend_argument(b)
    b.add_argument("--queued-steps", choices=["on", "off"], default=None,
                   help="the denoising loop's steps queued one ahead on CUDA (on: the default where it applies) or "
                        "each waited for (off)")
    b.add_argument("--lm-loop", choices=["on", "off"], default=None,
                   help="GPT-2's 8 passes on the device, queued on CUDA (on: the default where the device loop is) or "
                        "on the host, the sequence copied in and out at each (off)")
    b.add_argument("--weights-block", choices=["on", "off"], default=None,
                   help="the NhwcConv components' weights (UNet, VAE decoder) in one device allocation of the "
                        "runtime's own (on: the default on CUDA) or one allocation per weight, ONNX Runtime's (off)")
    _shared_arena_argument(b)
    b.add_argument("--uncaptured", type=_uncaptured_value, default=None, metavar="none|NAME,NAME...",
                   help="sessions run without a CUDA graph, comma-separated (the others captured), or none (every "
                        "session captured); default: every session captured where ONNX Runtime accepts it but "
                        "clap_text and projection, which run once per request (12-14 MiB less peak memory, ~1 ms)")
    b.add_argument("--provider-options", type=_json_object, default=None, metavar="JSON",
                   help='extra CUDA provider options per component over the defaults, e.g. '
                        '\'{"vocoder": {"cudnn_conv_algo_search": "EXHAUSTIVE"}}\' (backend ort, CUDA)')
    b.add_argument("--json", help="also write the result, every warm call's time included, to this JSON file")
    b.set_defaults(run=run_bench)

    d = sub.add_parser("demo", help="offline default: tiny random pipeline → export (cached) → generate → WAV")
    d.add_argument("prompt", nargs="?", default="a hammer hitting a wooden surface")
    d.add_argument("-o", "--output", default="demo.wav")
    d.add_argument("--cache", default=str(DEMO_DIR), help="where the tiny artefacts are kept")
    _generation_options(d)
    d.set_defaults(run=run_demo)


def _generation_options(p) -> None:
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seconds", type=float, default=None, help="audio length (default: the model's, 10.24 s)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--waveforms", type=int, default=1, help="waveforms per prompt, ranked by CLAP")
    p.add_argument("--scheduler", default=SCHEDULERS[0], choices=SCHEDULERS)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    _backend_argument(p)


def _backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="ort", choices=BACKENDS,
                        help="ort: ONNX Runtime, CPU or CUDA provider (default); ort-trt: ONNX Runtime's TensorRT "
                             "provider over the same ONNX files (CUDA); trt: TensorRT engines from `audioldm2-trt "
                             "build` (CUDA)")


def _progress(total_label: str):
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:  # tqdm is optional: plain dots instead
        return lambda i, n: print("." if i + 1 < n else ".\n", end="", file=sys.stderr, flush=True)
    bar = {}

    def update(i: int, n: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=n, desc=total_label, unit="step")
        bar["bar"].update(1)
        if i + 1 == n:
            bar["bar"].close()

    return update


def _generate(args, folder) -> int:
    from .audio import write_wav
    from .pipeline import AudioLDM2Runtime

    t0 = time.perf_counter()
    rt = AudioLDM2Runtime.load(folder, device=args.device, backend=args.backend,
                               ranking=args.waveforms > 1)  # CLAP's audio branch only ranks
    t1 = time.perf_counter()
    out = rt(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
             guidance_scale=args.guidance, audio_length_in_s=args.seconds, num_waveforms_per_prompt=args.waveforms,
             seed=args.seed, scheduler=args.scheduler, callback=_progress("denoising"))
    t2 = time.perf_counter()
    path = Path(args.output)
    paths = [path] if len(out.audios) == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(len(out.audios))]
    for p, audio in zip(paths, out.audios):
        write_wav(p, audio, out.sample_rate)
    seconds = out.audios.shape[1] / out.sample_rate
    print(f"wrote {', '.join(map(str, paths))}: {seconds:.2f} s at {out.sample_rate} Hz, seed {out.seed} "
          f"(load {t1 - t0:.1f} s, generate {t2 - t1:.1f} s)")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    return _generate(args, args.artifacts)


def run_demo(args: argparse.Namespace) -> int:
    from .artifacts import load_artifacts
    from .errors import ArtifactError

    folder = Path(args.cache)
    try:
        load_artifacts(folder)
    except ArtifactError:
        try:
            from ..export.onnx_export import export
            from ..export.sources import Source
        except ModuleNotFoundError as err:
            raise ArtifactError(f"no cached demo artefacts in {folder} and the export extra is missing ({err.name}); "
                                "pip install 'audioldm2-trt[export]'") from err
        print(f"exporting the tiny random pipeline to {folder} (once) …", file=sys.stderr)
        export(Source(random_config="tiny"), folder, overwrite=True)
    return _generate(args, folder)


def _json_object(text: str) -> dict:
    """An argparse type: a JSON object (for --provider-options)."""
    import json

    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of component → options, got {text!r}")
    return value


# --shared-arena's words → load(shared_arena=...); the flag alone means "all"; anything else is component names
SHARED_ARENA_CHOICES = {"default": None, "all": True, "none": False}


def _names(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated component names (checked by ``load``, which names any it does not know)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected component names, comma-separated, got {text!r}")
    return names


def _uncaptured_value(text: str) -> tuple[str, ...]:
    """--uncaptured's value: "none" (no session left uncaptured: ``()``), or comma-separated component names."""
    return () if text.strip() == "none" else _names(text)


def shared_arena_value(text: str):
    """--shared-arena's value → load(shared_arena=...): one of SHARED_ARENA_CHOICES' words, or comma-separated
    component names (checked by ``load``, which names any it does not know)."""
    if text in SHARED_ARENA_CHOICES:
        return SHARED_ARENA_CHOICES[text]
    try:
        return _names(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected {', '.join(SHARED_ARENA_CHOICES)} or component names, "
                                         f"got {text!r}") from None


def _shared_arena_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shared-arena", nargs="?", const=True, default=None, type=shared_arena_value,
                        metavar="default|all|none|NAME,NAME...",
                        help="which components share one ONNX Runtime memory arena: default (on CUDA the decode "
                             "stage's: vae_decoder,vocoder,clap_features,clap_audio, ~130 MiB less peak memory; none "
                             "on the CPU), none (one arena each), all (the flag alone), or component names, "
                             "comma-separated. On CUDA, with CUDA graphs only the decode stage's; any other only "
                             "uncaptured (bench: name it in --uncaptured too; docs/benchmarks.md runs BD-BN)")


def run_bench(args: argparse.Namespace) -> int:
    import json

    from .bench import bench, report

    request = BenchRequest(args.prompt, args.negative_prompt, args.steps, args.guidance, args.seconds,
                           args.waveforms, args.scheduler)
    options = {name: value == "on" for name, value in (("queued_steps", args.queued_steps), ("lm_loop", args.lm_loop))
               if value is not None}
    if args.weights_block is not None:
        options["weights_block"] = None if args.weights_block == "on" else False
    if args.provider_options is not None:
        options["provider_options"] = args.provider_options
    if args.shared_arena is not None:
        options["shared_arena"] = args.shared_arena
    if args.uncaptured is not None:
        from .pipeline import captured_except

        options["cuda_graphs"] = captured_except(args.uncaptured)
    result = bench(args.artifacts, args.device, args.runs, request, backend=args.backend, **options)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def run_serve(args) -> int:
    try:
        from .server import ServerLimits, serve
    except ModuleNotFoundError as err:
        print(f"audioldm2-trt serve needs the serve extra ({err.name} is missing): pip install 'audioldm2-trt[serve]'",
              file=sys.stderr)
        return 2
    serve(args.artifacts, args.host, args.port, args.device, args.max_batch, args.max_queue,
          ServerLimits(args.max_seconds, args.max_steps, 1 if args.no_ranking else 4, args.timeout),
          ranking=not args.no_ranking, shared_arena=args.shared_arena, backend=args.backend)
    return 0
