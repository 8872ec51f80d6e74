"""One ONNX Runtime memory arena per device, shared by the sessions that ask for it (``load(shared_arena=...)``: by
default on CUDA the decode stage's, ``backends.ort.SHARED_ARENA_DEFAULT``; ``True`` every component's, or component
names).

**On CUDA, sessions that capture CUDA graphs may share it only among the decode stage's** (the default since run BN;
``OrtSessionFactory.check_shared_arena_choice``, ``backends.ort.CAPTURED_ON_ARENA_CHECKED``): with the decode
stage's captured sessions on it (the default from run BA to BF too), two runtimes of one process driven from two
threads gave wrong audio, rel-L2 0.14-0.8 against their runs alone in most trials — the later-loaded runtime, and at
full size with two waveforms both (runs BF-BI; one arena per session: every trial matched). The cause is mended
(below) and the decode stage checked since at full size; other captured sessions are not (CLAP's text branch on it
gave wrong audio before the fix, runs BD-BE), and stay refused. Sessions that capture no graph may share it.
``ALLOW_ON_CUDA`` lifts the rule for diagnosis only (``scripts/shared_arena_check.py``). On the CPU there are no
captured graphs, the default is an arena per session, and sharing is ordinary arena use.

**The cause (runs BI-BJ), and the fix.** Since onnxruntime 1.23 the Python bindings allocate
``OrtValue.ortvalue_from_numpy`` / ``ortvalue_from_shape_and_type`` on a device from an allocator registered in the
environment for it — this arena, once registered (``scripts/ortvalue_allocator_probe.py`` on the H100, run BI: the
first value took the arena's 256 MiB first chunk). So every buffer the runtime binds (inputs, outputs, the loops'
latents), of every runtime of the process, came from the arena: a second runtime's, made at its first requests,
landed in blocks the first one's captured graphs write as scratch (rule 2 below, broken unseen). (The decode stage
*uncaptured* on the arena gave one two-waveform request of six full-size trials 0.619 from its run alone (run BI):
the distance of one request's pair swapped, which came back in runs BF and BL too — the ranking's order, below, most
likely, not wrong audio.) Now, on a device
whose arena is registered (``python_values_from_arena``), ``OrtSession`` makes its buffers in memory of the
runtime's own (``dlpack.own_value``), and the arena holds only what sessions allocate inside their runs. On the tiny
export (run BJ) the decode stage's captured sessions on the arena then gave two runtimes the right audio in 11 of 11
trials, against 3 of 5 wrong with the buffers from the arena (``--python-buffers``, the diagnosis switch
``OWN_BUFFERS``), and uncaptured 6 of 6. At full size (runs BL-BM, one H200) every request of 6 processes with the
captured decode stage on the arena got its waveforms right (the one control with the buffers from the arena: a NaN in
the UNet); where two waveforms came back in the other order, CLAP's scores of the pair lay 1.2e-5 apart, inside the
fp16 run-to-run spread (docs/benchmarks.md). So ``load`` takes the decode stage's captured sessions on the arena on
CUDA since, and by default since run BN (one H200: 8 more processes, every waveform right, and tests/test_gpu.py with
them). It takes back ~130 MiB of peak memory (run BN: 3282 MiB with one arena per session, 3150 with the decode stage
on the arena; B0 3126; run BL: 3166 with it uncaptured on it). A runtime loaded at the default while another of the
process that has served is still open keeps an arena per session (no session may join the arena after a capture:
rule 2 below); one loaded after every runtime with captured sessions on the arena has closed joins it again (their
graphs closed with them), so that a process that closes a runtime and loads another reuses the arena's memory
(``SharedArena.captured``; before, the later runtime kept arenas of its own beside the idle shared one: run CD,
358 MiB more at every reload of the full-size fp16 artefacts, ``scripts/reload_memory.py``).

Off the shared arena every ONNX Runtime session keeps an arena of its own, and on CUDA its captured graphs pin that
arena's activation memory: after the first call the runtime's ten sessions hold ten separate activation pools. With a
shared arena (ONNX Runtime's environment allocator, ``session.use_env_allocators``) the components reuse the same
blocks, as torch's caching allocator does for diffusers. On the H100 (docs/benchmarks.md, runs M–O) the fp16 runtime's
first call then grew by 308 MiB instead of 452 (diffusers: 388), its peak 3527 MiB instead of 3689, and 3697 instead
of 4119 once a two-waveform request had run too; the audio stayed within the fp16 UNet's run-to-run spread.

What was meant to make that safe with CUDA graphs. A captured graph replays into the addresses its intermediates had
when it was captured, and ONNX Runtime returns those blocks to the arena after the capture run; in a shared arena
another session's run may be handed the same blocks. Two rules were to keep that harmless:

1. Runs never overlap. Every run of a session on the arena holds the arena's ``lock`` from its launch to the
   synchronisation of its outputs (``OrtSession`` does this); between runs a graph's intermediates are dead. So a
   session on the arena never queues a run without waiting for it (``OrtSession.replay(wait=False)`` waits there,
   and the factory gives it no loop stream): the loops' steps are then each waited for.
2. Nothing long-lived lands in the arena once a graph was captured. Weights go to the device allocator
   (``session.use_device_allocator_for_initializers``; a session with packed weights reserves one block for all of
   them, outside the arena's pool too), and no session may join the arena after one of its graphs has been captured
   (kernels' prepacked weights would come from the arena): ``check_can_join`` raises, naming the remedy (create
   every session, of every runtime that shares the arena, before the first request).

What these rules missed: the runtime's own buffers in the arena (above); (b), state a kernel allocates from the
arena at its first run with a shape and keeps, would have the same effect: not seen for the decode stage's sessions
in runs BJ-BM, and not checked for the others.

What it costs: on that device the runs of the components on it no longer overlap. With every component on it, two
requests in different stages take turns (run M: ~10 % less unbatched throughput at 4 and 16 concurrent clients, 2 %
with micro-batching) and the loops' steps are not queued; a decode stage alone on it runs one component at a time
within a request anyway, and only one request's decode stage waits for another's. The arena is the process's (ONNX
Runtime has one environment per process), so every runtime of the process on that device that asks for it shares
it, and it lives as long as the process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..errors import BackendError
from .base import Device

# ONNX Runtime's ArenaExtendStrategy: grow by what is asked for, not to the next power of two (as each session's own
# arena does here: cuda_provider_options)
_SAME_AS_REQUESTED = 1
SESSION_CONFIG = {"session.use_env_allocators": "1", "session.use_device_allocator_for_initializers": "1"}


@dataclass
class SharedArena:
    """The shared arena of one device: its run lock, and the open sessions on it that have captured a graph."""

    device: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _capturers: set = field(default_factory=set, repr=False)  # id() of each open session whose graph ran on it

    @property
    def captured(self) -> bool:
        """Whether a session on the arena that has captured a CUDA graph is still open. While one is, no session may
        join (rule 2 above). Once every one has closed, their graphs are gone with them, nothing replays into the
        arena's blocks, and sessions may join again: a runtime loaded after the one before it closed reuses the
        arena's memory instead of growing arenas of its own beside it."""
        return bool(self._capturers)

    def mark_captured(self, session) -> None:
        """``session`` (on this arena) has run a captured graph."""
        self._capturers.add(id(session))

    def release(self, session) -> None:
        """``session`` has closed, its graphs with it."""
        self._capturers.discard(id(session))

    def check_can_join(self, name: str) -> None:
        if self.captured:
            raise BackendError(
                f"{name}: cannot join the shared arena of {self.device}: a CUDA graph of a session on it has been "
                "captured already, and this session's long-lived buffers could land in that graph's memory. Create "
                "every runtime that shares the arena before its first request, or load this one with "
                "shared_arena=False")


# Diagnosis only (scripts/shared_arena_check.py --python-buffers): False leaves the runtime's bound buffers to ONNX
# Runtime's Python allocator — the shared arena, once it is registered (what runs BA-BI did). Never set by the runtime.
OWN_BUFFERS = True


def python_values_from_arena(device: Device) -> bool:
    """Whether ONNX Runtime's Python bindings allocate new OrtValues on ``device`` from the shared arena: once it is
    registered there (since onnxruntime 1.23 they take an allocator registered in the environment; measured on the
    H100, run BI). Then ``OrtSession`` makes its buffers in memory of its own instead (``dlpack.own_value``)."""
    return device.kind == "cuda" and str(device) in _ARENAS


# Diagnosis only: let load put any captured session on the arena on CUDA, where only the decode stage's are checked
# (above; tests set it to test the rule's bypass). Never set by the runtime.
ALLOW_ON_CUDA = False

_ARENAS: dict[str, SharedArena] = {}
_REGISTER = threading.Lock()


def shared_arena(ort, device: Device) -> SharedArena:
    """The shared arena of ``device``, registered in ONNX Runtime's environment on first use (once per process)."""
    key = str(device)
    with _REGISTER:
        arena = _ARENAS.get(key)
        if arena is None:
            config = ort.OrtArenaCfg({"arena_extend_strategy": _SAME_AS_REQUESTED})
            try:
                if device.kind == "cuda":
                    info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device.index,
                                             ort.OrtMemType.DEFAULT)
                    ort.create_and_register_allocator_v2("CUDAExecutionProvider", info,
                                                         {"device_id": str(device.index)}, config)
                else:
                    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                             ort.OrtMemType.DEFAULT)
                    ort.create_and_register_allocator(info, config)
            except Exception as err:
                raise BackendError(f"could not register a shared ONNX Runtime arena on {device}: {err}") from err
            arena = _ARENAS[key] = SharedArena(key)
        return arena
