"""One ONNX Runtime memory arena per device, shared by the sessions that ask for it (``load(shared_arena=...)``: by
default on CUDA the decode stage's, ``backends.ort.SHARED_ARENA_DEFAULT``; ``True`` every component's).

By default every ONNX Runtime session keeps an arena of its own, and on CUDA its captured graphs pin that arena's
activation memory: after the first call the runtime's ten sessions hold ten separate activation pools. With a shared
arena (ONNX Runtime's environment allocator, ``session.use_env_allocators``) the components reuse the same blocks, as
torch's caching allocator does for diffusers. On the H100 (docs/benchmarks.md, runs M–O) the fp16 runtime's first
call then grew by 308 MiB instead of 452 (diffusers: 388), its peak 3527 MiB instead of 3689, and 3697 instead of
4119 once a two-waveform request had run too; the audio stayed within the fp16 UNet's run-to-run spread.

What makes that safe with CUDA graphs. A captured graph replays into the addresses its intermediates had when it
was captured, and ONNX Runtime returns those blocks to the arena after the capture run; in a shared arena another
session's run may be handed the same blocks. Two rules keep that harmless:

1. Runs never overlap. Every run of a session on the arena holds the arena's ``lock`` from its launch to the
   synchronisation of its outputs (``OrtSession`` does this); between runs a graph's intermediates are dead. So a
   session on the arena never queues a run without waiting for it (``OrtSession.replay(wait=False)`` waits there,
   and the factory gives it no loop stream): the loops' steps are then each waited for.
2. Nothing long-lived lands in the arena once a graph was captured. Weights go to the device allocator
   (``session.use_device_allocator_for_initializers``; a session with packed weights reserves one block for all of
   them, outside the arena's pool too), and no session may join the arena after one of its graphs has been captured
   (kernels' prepacked weights would come from the arena): ``check_can_join`` raises, naming the remedy (create
   every session, of every runtime that shares the arena, before the first request).

What it costs: on that device the runs of the components on it no longer overlap. With every component on it, two
requests in different stages take turns (run M: ~10 % less unbatched throughput at 4 and 16 concurrent clients, 2 %
with micro-batching) and the loops' steps are not queued; the default's decode stage runs one component at a time
within a request anyway, and only one request's decode stage waits for another's. The arena is the process's (ONNX Runtime has one environment per
process), so every runtime of the process on that device that asks for it shares it, and it lives as long as the
process. Device buffers bound by the runtime (inputs, outputs, the denoising loop's latents) are OrtValues from
ONNX Runtime's Python allocator, never from this arena.
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
    """The shared arena of one device: its run lock, and whether a graph of it has been captured."""

    device: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    captured: bool = False

    def check_can_join(self, name: str) -> None:
        if self.captured:
            raise BackendError(
                f"{name}: cannot join the shared arena of {self.device}: a CUDA graph of a session on it has been "
                "captured already, and this session's long-lived buffers could land in that graph's memory. Create "
                "every runtime that shares the arena before its first request, or load this one with "
                "shared_arena=False")


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
