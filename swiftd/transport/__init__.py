"""The residual data plane: how a ControlNet worker's residuals reach the UNet worker.

The gRPC residual stream stays the control plane (session, step inputs, which step is ready);
the residual bytes take the fastest path both workers support, chosen when the stream opens:

    INLINE          bytes in the stream (any two hosts; fp16 on CUDA by default)
    SHARED_MEMORY   same host: a ring of residual buffers in /dev/shm (shm.py); CPU tensors, or
                    CUDA tensors the peer cannot map (one GPU per container): a copy through
                    host memory on each side
    CUDA_IPC        same host, CUDA tensors on a GPU both workers see: device buffers shared
                    over CUDA IPC (cuda_ipc.py)

Negotiation, in the stream itself:

1. The UNet worker's SessionStart offers the transports it can read and says where it runs
   (`Peer`): its `host_identity`, the UUIDs of the GPUs it sees, its PID namespace.
2. The ControlNet worker picks the first offered one it can write: same host identity, a device
   the transport fits, and for CUDA IPC a GPU the UNet worker sees and the same PID namespace.
   Its first response carries that step's residuals inline plus the `ring` it will write from
   then on.
3. The UNet worker maps the ring, connects to the ring's step socket (step_socket.py) and says so
   in its next StepInput (`transport`), or answers INLINE when it cannot (logged). From then on
   the ControlNet worker computes each step's residuals straight into the next slot, the UNet
   worker writes each step's sample into the ring's sample buffer, and the per-step messages
   (StepInput with only the step's number and timestep; ResidualsResponse with only `slot`, its
   index and sequence number) go over the step socket; the stream stays open as the session's
   control plane. Over CUDA IPC nothing in a step waits for a GPU: IPC events order both
   directions (through a shared-memory ring, GPU tensors are copied out once made).

A ring's name is removed from /dev/shm as soon as the reader has mapped it, so a worker killed at
any later moment leaves nothing behind; one killed before that is cleaned at the next start of a
ControlNet worker on the host (`shm.remove_abandoned`), and the writer removes an unanswered
ring when its stream ends. A shared-memory ring whose session ended cleanly stays mapped on both
sides for the next session of the same two workers (idle.py).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from swiftd.v1 import common_pb2

INLINE = common_pb2.RESIDUAL_TRANSPORT_INLINE
SHARED_MEMORY = common_pb2.RESIDUAL_TRANSPORT_SHARED_MEMORY
CUDA_IPC = common_pb2.RESIDUAL_TRANSPORT_CUDA_IPC

NAMES = {INLINE: "inline", SHARED_MEMORY: "shared_memory", CUDA_IPC: "cuda_ipc"}
BY_NAME = {name: value for value, name in NAMES.items()}
#: What a worker offers (UNet) or accepts (ControlNet) by default, fastest first.
DEFAULT = ("cuda_ipc", "shared_memory")

# Where shared-memory rings live: a tmpfs both workers mount. Docker gives a container only 64 MiB
# of /dev/shm by default, less than one SDXL ring: raise --shm-size, or point both workers at a
# bigger tmpfs here (an emptyDir with medium: Memory on Kubernetes).
SHM_DIR = Path(os.environ.get("SWIFTD_SHM_DIR", "/dev/shm"))


def name(transport: int) -> str:
    return NAMES.get(transport, "in_process")


def parse(names: list[str] | tuple[str, ...]) -> tuple[int, ...]:
    """Transport enum values from names such as `--residual-transports shared_memory inline`
    (INLINE is always possible and need not be listed)."""
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown residual transport(s) {unknown}; choose from {sorted(BY_NAME)}")
    return tuple(BY_NAME[n] for n in names if BY_NAME[n] != INLINE)


@functools.cache
def host_identity() -> str:
    """Equal for two processes exactly when they can share memory: the same kernel boot and the
    same /dev/shm mount (pods on one node have their own /dev/shm unless they share one)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        shm = os.stat(SHM_DIR)
    except OSError:
        return ""  # no /proc or /dev/shm: nothing to share
    return f"{boot}/{shm.st_dev}"


@functools.cache
def pid_namespace() -> str:
    """This process's PID namespace ("pid:[4026531836]"), or "" where /proc cannot tell."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Peer:
    """Where a UNet worker runs, as its SessionStart says: what decides which transports reach it."""

    host_identity: str = ""  # shared memory: the same one (host_identity())
    gpus: tuple[str, ...] = ()  # CUDA IPC: the UUIDs of the GPUs it sees (empty: not told)
    pid_namespace: str = ""  # CUDA IPC: handles open only in the exporter's PID namespace ("": not told)

    @classmethod
    def from_pb(cls, start) -> Peer:
        return cls(start.host_identity, tuple(start.gpu_uuids), start.pid_namespace)

    def can_map_cuda(self, gpu: str | None) -> bool:
        """Whether it can open CUDA IPC memory on the GPU with UUID `gpu` of this process.
        Whatever either side could not tell is assumed to fit (the peer declines if it does not)."""
        visible = not self.gpus or gpu is None or gpu in self.gpus
        return visible and (not self.pid_namespace or self.pid_namespace == pid_namespace())


def usable(transports: tuple[int, ...], device_type: str) -> tuple[int, ...]:
    """Those of `transports` this process can use with tensors on `device_type`."""
    out = []
    for transport in transports:
        if transport == SHARED_MEMORY and host_identity():
            out.append(transport)  # CUDA tensors too (a copy through host memory beats protobuf)
        elif transport == CUDA_IPC and device_type == "cuda":
            out.append(transport)
    return tuple(out)


def choose(offered, peer: Peer, accepted: tuple[int, ...], device_type: str, gpu: str | None = None) -> int:
    """The ControlNet worker's pick: the first offered transport it accepts and can use here.

    CUDA_IPC only when the peer can map memory on this worker's GPU (`gpu`, its UUID): with one
    GPU per container, or containers with PID namespaces of their own, it could not, and shared
    memory (a copy through host memory on each side) still beats bytes in the stream."""
    if not peer.host_identity or peer.host_identity != host_identity():
        return INLINE
    mine = usable(accepted, device_type)
    return next((t for t in offered if t in mine and (t != CUDA_IPC or peer.can_map_cuda(gpu))), INLINE)


def ring_class(chosen: int):
    """The ring type of a transport: ShmRing or CudaIpcRing (same interface: create/attach,
    to_pb, fits, next_slot/commit or write, read, unlink, close)."""
    if chosen == CUDA_IPC:
        from swiftd.transport.cuda_ipc import CudaIpcRing

        return CudaIpcRing
    if chosen == SHARED_MEMORY:
        from swiftd.transport.shm import ShmRing

        return ShmRing
    raise ValueError(f"no ring for residual transport {chosen}")


def add_argument(parser, role: str) -> None:
    """`--residual-transports`: what a UNet worker offers / a ControlNet worker accepts."""
    parser.add_argument(
        "--residual-transports",
        nargs="*",
        default=list(DEFAULT),
        choices=[n for n in BY_NAME if n != "inline"],
        metavar="NAME",
        help=f"residual transports this worker {role} besides inline bytes, fastest first: cuda_ipc, "
        "shared_memory (same host only; chosen per stream). None: always inline",
    )
