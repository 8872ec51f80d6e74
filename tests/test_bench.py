"""``audioldm2-trt bench``: stage medians computed as stated, the command's result consistent with its own calls,
bad input refused before anything loads."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import pytest

from audioldm2_trt.runtime.backends.nvml import GpuMemory
from audioldm2_trt.runtime.bench import BenchRequest, bench, sessions_without_cuda_graphs, stage_medians_ms

from .conftest import needs_export


def _call(text, unet, vae, vocoder, total, ranking=None):
    call = {"text": text, "unet": unet, "vae": vae, "vocoder": vocoder, "total": total}
    if ranking is not None:
        call["ranking"] = ranking
    return call


def test_stage_medians_against_hand_computed_values():
    calls = [_call(0.010, [0.001, 0.003], 0.002, 0.004, 0.021),
             _call(0.020, [0.002, 0.002], 0.004, 0.006, 0.040),
             _call(0.030, [0.005, 0.001], 0.006, 0.008, 0.050)]
    got = stage_medians_ms(calls)
    # steps 1, 3, 2, 2, 5, 1 ms → median 2; loops 4, 4, 6 → 4; host glue 21-20, 40-34, 50-50 ms → 1, 6, 0 → 1
    want = {"text": 20.0, "unet_step": 2.0, "unet_total": 4.0, "vae": 4.0, "vocoder": 6.0, "host_glue": 1.0,
            "total": 40.0}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_stage_medians_count_the_ranking_when_every_call_ranked():
    calls = [_call(0.010, [0.002], 0.001, 0.001, 0.020, ranking=0.005),
             _call(0.010, [0.002], 0.001, 0.001, 0.024, ranking=0.007)]
    got = stage_medians_ms(calls)
    assert got["ranking"] == pytest.approx(6.0)
    assert got["host_glue"] == pytest.approx(statistics.median([1.0, 3.0]))  # 20-19, 24-21 ms
    with pytest.raises(ValueError, match="no timed calls"):
        stage_medians_ms([])


@needs_export
def test_bench_cli_reports_its_own_calls(tiny_artifacts, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "audioldm2_trt.cli", "bench", "--artifacts", str(tiny_artifacts),
                        "--runs", "3", "--steps", "3", "--seconds", "1.5", "--waveforms", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert (res["runs"], len(res["all_s"])) == (3, 3)
    assert res["median_s"] == statistics.median(res["all_s"])
    assert (res["min_s"], res["max_s"]) == (min(res["all_s"]), max(res["all_s"]))
    assert res["cold_start_s"] == pytest.approx(res["load_s"] + res["first_s"])
    assert res["audio_s"] == 1.5  # 24000 samples at 16 kHz
    assert (res["precision"], res["device"], res["gpu"]) == ("fp32", "cpu", None)
    assert res["request"]["num_inference_steps"] == 3 and res["request"]["num_waveforms_per_prompt"] == 2
    stages = res["stages_ms"]
    assert set(stages) == {"text", "unet_step", "unet_total", "vae", "vocoder", "ranking", "host_glue", "total"}
    assert 0 < stages["unet_step"] <= stages["unet_total"] <= stages["total"]
    assert min(res["all_s"]) * 1e3 <= stages["total"] <= max(res["all_s"]) * 1e3
    assert "end to end over 3 warm calls" in r.stdout and "ranking" in r.stdout


@needs_export
def test_bench_one_waveform_has_no_ranking_stage(tiny_artifacts):
    res = bench(tiny_artifacts, "cpu", runs=1, request=BenchRequest(steps=2, seconds=1.0))
    assert "ranking" not in res["stages_ms"] and res["audio_s"] == 1.0
    assert res["gpu_memory_mib"] is None and "gpu_memory_error" not in res  # the CPU has no GPU memory to report
    assert (res["queued_steps"], res["lm_loop"]) == (None, "host")  # the CPU's default: both loops on the host
    assert res["without_cuda_graphs"] == []  # only CUDA captures graphs: nothing to name on the CPU


@needs_export
def test_sessions_without_cuda_graphs_names_only_sessions_that_ran(tiny_artifacts):
    """The helper behind ``without_cuda_graphs`` (``bench``, benchmark.py) lists the sessions that ran without a
    graph; the ranking's sessions, which a one-waveform request never runs, are not among them until they run (run
    BV's benchmark named them after one-waveform calls). The CPU captures nothing, so every session that ran is."""
    from audioldm2_trt.runtime import AudioLDM2Runtime

    rt = AudioLDM2Runtime.load(tiny_artifacts, device="cpu")
    try:
        rt(prompt="a dog barks", num_inference_steps=2, audio_length_in_s=1.0, seed=0)
        ran = {name for name, c in rt.health()["components"].items() if c["runs"] > 0}
        assert {"clap_text", "t5_encoder", "unet", "vae_decoder", "vocoder"} <= ran
        assert "clap_audio" not in ran
        assert sessions_without_cuda_graphs(rt.health()) == sorted(ran)
        rt(prompt="a dog barks", num_inference_steps=2, audio_length_in_s=1.0, num_waveforms_per_prompt=2, seed=0)
        assert "clap_audio" in sessions_without_cuda_graphs(rt.health())
    finally:
        rt.close()


@needs_export
def test_bench_says_where_gpt2_ran(tiny_artifacts):
    """device_loop=True binds the CPU sessions, and GPT-2's passes then run over device buffers (``lm_loop``)."""
    request = BenchRequest(steps=2, seconds=1.0)
    assert bench(tiny_artifacts, "cpu", runs=1, request=request, device_loop=True)["lm_loop"] == "device"
    assert bench(tiny_artifacts, "cpu", runs=1, request=request, device_loop=True, lm_loop=False)["lm_loop"] == "host"


@pytest.mark.parametrize("value, message", [
    ("[1]", "expected a JSON object of component → options, got '[1]'"),
    ("{oops", "not JSON"),
])
def test_bench_provider_options_must_be_a_json_object(tmp_path, value, message):
    r = subprocess.run([sys.executable, "-m", "audioldm2_trt.cli", "bench", "--artifacts", str(tmp_path / "none"),
                        "--provider-options", value], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr


@needs_export
def test_bench_shared_arena_takes_component_names(tiny_artifacts, capsys):
    """``--shared-arena`` takes component names, comma-separated, as well as default|all|none; a name that is no
    component is refused, naming it, before any run."""
    from audioldm2_trt.cli import main

    assert main(["bench", "--artifacts", str(tiny_artifacts), "--runs", "1", "--steps", "2", "--seconds", "1.0",
                 "--shared-arena", "t5_encoder,nonsense"]) == 2
    assert "shared_arena names unknown components ['nonsense']" in capsys.readouterr().err
    assert main(["bench", "--artifacts", str(tiny_artifacts), "--runs", "1", "--steps", "2", "--seconds", "1.0",
                 "--shared-arena", "vocoder,t5_encoder"]) == 0
    assert "on the shared ONNX Runtime arena: t5_encoder, vocoder" in capsys.readouterr().out


def test_gpu_memory_sampler_keeps_every_reading_in_order():
    readings = iter(range(100, 100_000, 10))
    mem = GpuMemory(read=lambda: float(next(readings)), interval_s=0.001)
    with mem:
        time.sleep(0.05)
    n = len(mem.samples)
    values = [m for _, m in mem.samples]
    assert n >= 3 and values == [100.0 + 10 * k for k in range(n)]  # start, the thread's, the stop's
    stamps = [t for t, _ in mem.samples]
    assert stamps == sorted(stamps)
    assert (mem.peak_mib, mem.mib) == (values[-1], values[-1] - 100.0)
    assert mem.at(stamps[1]) == values[1] and mem.at(stamps[0] - 1.0) == values[0]
    mem.stop()  # once more: the sampling has ended, no reading
    assert len(mem.samples) == n
    assert mem.read() == values[-1] + 10 and len(mem.samples) == n + 1  # one reading on demand, kept
    assert mem.peak_mib == values[-1] + 10


def test_gpu_memory_reader_says_what_is_missing():
    from audioldm2_trt.runtime.backends import nvml
    from audioldm2_trt.runtime.errors import BackendError

    if nvml._nvml() is None:
        with pytest.raises(BackendError, match=r"NVML \(libnvidia-ml\) is not available"):
            nvml.used_memory_reader(0)
    else:  # a machine with an NVIDIA driver: the reading is the GPU's used memory, in MiB
        assert nvml.used_memory_reader(0)() > 0


@pytest.mark.parametrize("runs", ["0", "-2"])
def test_bench_bad_runs_is_refused_before_loading(tmp_path, runs):
    r = subprocess.run([sys.executable, "-m", "audioldm2_trt.cli", "bench", "--artifacts", str(tmp_path / "none"),
                        "--runs", runs], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"audioldm2-trt bench: error: runs must be an integer ≥ 1, got {runs}"


def test_bench_uncaptured_takes_session_names(tiny_artifacts, capsys):
    """``--uncaptured`` names sessions to run without a CUDA graph; a name that is no session is refused, naming it,
    before any run. (On the CPU nothing is captured either way: this checks the option's path, not capture.)"""
    from audioldm2_trt.cli import main
    from audioldm2_trt.runtime.cli import _uncaptured_value

    assert main(["bench", "--artifacts", str(tiny_artifacts), "--runs", "1", "--steps", "2", "--seconds", "1.0",
                 "--uncaptured", "t5_encoder,nonsense"]) == 2
    assert "uncaptured names unknown components ['nonsense']" in capsys.readouterr().err
    assert main(["bench", "--artifacts", str(tiny_artifacts), "--runs", "1", "--steps", "2", "--seconds", "1.0",
                 "--uncaptured", "clap_text,t5_encoder,projection"]) == 0
    # "none": every session captured, CLAP's text branch and the projection too (the default leaves them out)
    assert _uncaptured_value("none") == () and _uncaptured_value("clap_text, vocoder") == ("clap_text", "vocoder")
    with pytest.raises(argparse.ArgumentTypeError, match="expected component names, comma-separated, got ','"):
        _uncaptured_value(",")
    assert main(["bench", "--artifacts", str(tiny_artifacts), "--runs", "1", "--steps", "2", "--seconds", "1.0",
                 "--uncaptured", "none"]) == 0
