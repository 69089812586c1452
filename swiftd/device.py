"""Which device a worker computes on: as a worker reports it, and as the gateway compares it.

The gateway plans by device, not by worker: a ControlNet worker pinned to the same core as a
UNet worker does not add a device, it shares one, and spreading a ControlNet onto it while that
UNet worker runs only makes both slower. So every worker reports its device (GetWorkerStatus,
ListControlNets) and its host, and two workers share a device when they are on one host and

- on CPU, the sets of cores they may run on overlap (a CPU "device" is the cores a process is
  pinned to, `--cpu-cores`; an unpinned process may run on every core);
- on a GPU, they name the same physical GPU: `cuda:<its UUID>` where the driver tells it, else
  `cuda:N` with N through CUDA_VISIBLE_DEVICES; so two processes that each see their GPU as
  cuda:0 (two containers of one pod, each given its GPU by the device plugin) are told apart.

A worker that reports no device (an older one) is taken to be alone on its own.

Workers also report their host and shared-memory namespace (swiftd.transport.host_identity): a
ControlNet worker that shares it with a UNet worker hands its residuals over through shared memory
or CUDA IPC, any other as bytes over the network, so the gateway prefers one that shares it.

No torch import: the gateway uses this module without it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

GPU_POLL_S = 0.0005  # between looks at GPU work (what is waited for is queued milliseconds long)
STOP_EVERY = 20  # looks between calls of `stop` (it may do work: a cancelled RPC, a deadline)


def local_host() -> str:
    return socket.gethostname()


def local_device(device: str) -> str:
    """This process's device as reported: "cpu:<cores>" for the cores it may run on (call after
    pinning), "cuda:<GPU UUID>" (else "cuda:<physical index>") for a GPU, other devices as torch
    names them."""
    kind, _, index = str(device).partition(":")
    if kind == "cpu":
        return "cpu:" + format_cores(os.sched_getaffinity(0))
    if kind == "cuda":
        index = index or "0"
        uuid = gpu_uuid(int(index)) if index.isdigit() else None
        if uuid is not None:
            return f"cuda:{uuid}"
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if index.isdigit() and int(index) < len(visible):
            index = visible[int(index)]  # the physical GPU (an index or a UUID)
        return f"cuda:{index}"
    return str(device)


# CUDA errors that leave a process's context unusable (the runtime's sticky errors, a lost or
# failing GPU): every later call fails the same way, and only a new process recovers.
FATAL_CUDA_ERRORS = (
    "an illegal memory access was encountered",
    "unspecified launch failure",
    "device-side assert triggered",
    "an illegal instruction was encountered",
    "misaligned address",
    "invalid program counter",
    "hardware stack error",
    "operation not supported on global/shared address space",
    "uncorrectable ECC error encountered",
    "the launch timed out and was terminated",
    "unknown error",
)


def failure(exc: BaseException | None) -> str | None:
    """What made this process's device unusable, when `exc` or an exception it was raised from or
    during says so (a CUDA error from the list above, as torch words it; cleanup code that failed
    after it must not hide it); None for anything else, running out of memory included."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        message = str(exc)
        if "CUDA error" in message or type(exc).__name__ == "AcceleratorError":
            found = next((error for error in FATAL_CUDA_ERRORS if error in message), None)
            if found is not None:
                return found
        exc = exc.__cause__ or exc.__context__
    return None


def gpu_uuid(index: int) -> str | None:
    """The UUID of this process's GPU `index`, where torch is loaded (a worker) and can tell it."""
    torch = sys.modules.get("torch")  # never imported here: the gateway runs without torch
    if torch is None or not torch.cuda.is_available():
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except (AttributeError, RuntimeError, AssertionError):
        return None
    # As nvidia-smi and CUDA_VISIBLE_DEVICES write it (torch gives the bare UUID; MIG ones keep theirs).
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def wait_for_gpu(work, stop: Callable[[], bool] | None = None) -> bool:
    """Until the GPU has done `work` (a CUDA event or stream: anything with `query()`), True; or
    until `stop()` says to give up, False. Polled: a synchronising wait spins a core all along and
    cannot be given up (a GPU that never gets there, waiting on a dead peer's event, would hold
    the caller for good)."""
    looks = 0
    while not work.query():
        looks += 1
        if stop is not None and looks % STOP_EVERY == 0 and stop():
            return False
        time.sleep(GPU_POLL_S)
    return True


def format_cores(cores) -> str:
    """{0, 1, 2, 3, 8} -> "0-3,8"."""
    ordered = sorted(cores)
    runs: list[list[int]] = []
    for core in ordered:
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_cores(text: str) -> frozenset[str]:
    """ "0-3,8" -> {"0", "1", "2", "3", "8"}; anything unparsable is kept as one opaque unit."""
    cores: set[str] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if dash and first.isdigit() and last.isdigit():
            cores.update(str(c) for c in range(int(first), int(last) + 1))
        elif part.strip():
            cores.add(part.strip())
    return frozenset(cores)


@dataclass(frozen=True)
class Device:
    """A device as the gateway compares them: a host, a kind ("cpu", "cuda", ...) and the units of
    that kind it covers (cores, or one GPU)."""

    host: str
    kind: str
    units: frozenset[str]
    name: str  # as reported, for plans' reasons and logs
    memory: str = ""  # the worker's host and shared-memory namespace; "" = not reported

    @classmethod
    def of(cls, host: str, device: str, worker: str, memory: str = "") -> Device:
        """The device a worker reported; `worker` (its address) stands in when it reported none."""
        if not device:
            return cls("", "worker", frozenset([worker]), worker, memory)
        kind, _, units = device.partition(":")
        if kind == "cpu":
            # An unpinned report ("cpu") may run anywhere on the host: it overlaps every core.
            return cls(host, kind, parse_cores(units) if units else frozenset(["*"]), device, memory)
        return cls(host, kind, frozenset([units or "0"]), device, memory)

    def shares_memory_with(self, other: Device) -> bool:
        """Residuals between workers on the two go through shared memory or CUDA IPC."""
        return bool(self.memory) and self.memory == other.memory

    def shares_with(self, other: Device) -> bool:
        if (self.host, self.kind) != (other.host, other.kind):
            return False
        return bool(self.units & other.units) or "*" in self.units or "*" in other.units

    def __str__(self) -> str:
        return self.name
