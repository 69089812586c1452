"""A ring of residual buffers in shared memory (/dev/shm), written by a ControlNet worker in place
and read by the UNet worker on the same host.

Layout of the segment `/dev/shm/swiftd-res-<creator pid>.<its start time>-<random>`:

    header   one little-endian uint64 per slot: the sequence number of the step the slot holds,
             0 while the writer fills it; then one for the sample: step_index + 1 of the sample
             the buffer holds, 0 while the UNet worker writes it (padded to 64 bytes)
    slot 0   the step's residuals, each at its TensorLayout offset (64-byte aligned)
    slot 1   ...
    sample   the step's input the other way: the UNet worker writes each step's sample here and
             sends only the step's number and timestep (shaped as the sample of the step the ring
             was offered with; another shape goes as bytes)

The writer fills slots in turn: header 0, tensors, header = sequence, then sends the slot in the
stream. The reader checks the header holds the sequence it was told, copies the tensors out, and
checks again: a slot overwritten or half-written is an error, never residuals. (The protocol
already keeps the writer a full step behind the reader's copy: step k+1's input is sent only after
step k's residuals were taken, and there are two slots.) The sample buffer is checked the same way
by its header word.

With GPU tensors (a ControlNet worker on a GPU the UNet worker cannot map: one per container), a
process page-locks its mapping once (cudaHostRegister, as NCCL's shared-memory transport does),
so copies in and out run at full PCIe bandwidth, and the reader copies a slot to its GPU on a side
stream of its own: the copy waits for nothing the UNet has queued, and overlaps its encoder half.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
import os
import secrets
from pathlib import Path

import numpy as np
import torch

from swiftd.transport import SHARED_MEMORY, SHM_DIR
from swiftd.transport.layout import SLOTS, Layout, SlotLayout, TornRead, aligned, check_index, sample_layout
from swiftd.v1 import controlnet_pb2

log = logging.getLogger(__name__)

PREFIX = "swiftd-res-"  # rings and their step sockets (step_socket.py): one start-up sweep removes both


def fresh_name(suffix: str = "") -> str:
    """A new name under SHM_DIR for this process; the pid and start time in it tell the sweep
    whose it is."""
    return f"{PREFIX}{_owner(os.getpid())}-{secrets.token_hex(8)}{suffix}"


@functools.cache  # by pid: a forked child names its rings anew
def _owner(pid: int) -> str:
    """ "<pid>.<start time>": one process, even where pids are reused (a restarted container's
    worker is often pid 1 again, on a /dev/shm that outlived the last one); "<pid>" where the
    start time cannot be read."""
    started = _start_time(pid)
    return str(pid) if started is None else f"{pid}.{started}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat, field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the fields after the command's ")" start at field 3


def check_name(name: str, what: str) -> None:
    """ValueError for a name a peer sent that is not one of ours (another prefix, a path)."""
    if not name.startswith(PREFIX) or "/" in name:
        raise ValueError(f"not a {what}: {name!r}")


class ShmRing:
    """One session's ring; `create` on the writer's side, `attach` on the reader's."""

    def __init__(
        self, name: str, fd: int, layout: SlotLayout, slots: int, owner: bool, sample: torch.Tensor | Layout | None
    ):
        """`sample`: the writer's, an example of the step inputs to plan the sample buffer for;
        the reader's, the buffer's layout as offered (None: samples go as bytes)."""
        self.name = name
        self.layout = layout
        self.slots = slots
        slot_bytes = layout.slot_bytes
        self.header_bytes = aligned(8 * (slots + 1))  # one word per slot, one for the sample
        self._owner = owner
        self._linked = owner
        size = self.header_bytes + slots * slot_bytes
        if isinstance(sample, torch.Tensor):
            sample = Layout(sample.dtype, tuple(sample.shape), size)
        self.sample_layout = sample
        if sample is not None:
            if sample.offset < size:
                raise ValueError("the sample buffer overlaps the residual slots")
            size = sample.offset + aligned(sample.nbytes)
        try:
            if owner:
                # Reserve the pages now: tmpfs grants a size lazily, and a write past what it can
                # hold would kill the writer (SIGBUS) instead of failing here (ENOSPC -> inline).
                os.posix_fallocate(fd, 0, size)
            elif os.fstat(fd).st_size < size:
                raise ValueError(f"shared memory {name} is smaller than its layout says")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._header = np.frombuffer(self._map, dtype="<u8", count=slots + 1)
        self._sample = None
        if sample is not None:
            self._sample = torch.frombuffer(
                self._map, dtype=sample.dtype, count=math.prod(sample.shape), offset=sample.offset
            ).view(sample.shape)
        self._views = [
            [
                torch.frombuffer(
                    self._map,
                    dtype=tensor.dtype,
                    count=math.prod(tensor.shape),
                    offset=self.header_bytes + i * slot_bytes + tensor.offset,
                ).view(tensor.shape)
                for tensor in layout.tensors
            ]
            for i in range(slots)
        ]
        self._sequence = 0
        self._pinned = None  # the mapping's address once page-locked for GPU copies (0: refused)
        self._copy_stream = None  # the reader's, for copies to a GPU

    # -- writer --------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        tensors: list[torch.Tensor],
        wire_dtype: torch.dtype | None,
        sample: torch.Tensor | None = None,
        slots: int = SLOTS,
    ) -> ShmRing:
        """A ring whose slots fit `tensors` (cast to `wire_dtype`), with a sample buffer that
        fits `sample` (the step input the ring is offered with), under a fresh name."""
        name = fresh_name()
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            ring = cls(name, fd, SlotLayout.plan(tensors, wire_dtype), slots, owner=True, sample=sample)
        except BaseException:
            (SHM_DIR / name).unlink(missing_ok=True)
            raise
        if tensors[0].is_cuda:
            ring._pin(tensors[0].device)  # GPU residuals are copied in every step
        return ring

    def fits(self, tensors: list[torch.Tensor]) -> bool:
        return self.layout.fits(tensors)

    def serves(self, tensors: list[torch.Tensor], wire_dtype: torch.dtype | None, sample: torch.Tensor | None) -> bool:
        """Whether `create(tensors, wire_dtype, sample)` would plan this very ring (idle.py: a ring
        kept from an earlier session, offered again)."""
        if self.layout != SlotLayout.plan(tensors, wire_dtype) or (sample is None) != (self.sample_layout is None):
            return False
        return sample is None or self.sample_layout.fits(sample)

    def reuse(self, tensors: list[torch.Tensor]) -> ShmRing:
        """This ring, kept idle after an earlier session, for a new one: no slot or sample marked
        as holding a step (the sequence numbers run on)."""
        self._header[:] = 0
        if tensors[0].is_cuda:
            self._pin(tensors[0].device)
        return self

    def next_slot(self) -> list[torch.Tensor]:
        """The next slot's tensors, marked as being written: fill them (the ControlNet step
        computes its weighted residuals straight into them), then `commit`."""
        self._sequence += 1
        index = (self._sequence - 1) % self.slots
        self._header[index] = 0
        return self._views[index]

    def commit(self) -> controlnet_pb2.ResidualSlot:
        """Mark the slot `next_slot` handed out as holding this step; its address."""
        index = (self._sequence - 1) % self.slots
        self._header[index] = self._sequence
        return controlnet_pb2.ResidualSlot(index=index, sequence=self._sequence)

    def write(self, tensors: list[torch.Tensor]) -> controlnet_pb2.ResidualSlot:
        """Copy one step's residuals into the next slot (casting to the wire dtype); its address."""
        for view, tensor in zip(self.next_slot(), tensors):
            view.copy_(tensor)  # on CUDA: one device-to-host copy straight into the slot
        return self.commit()

    def read_sample(self, step_index: int) -> torch.Tensor:
        """A copy of the step's sample the UNet worker wrote; TornRead if the buffer does not
        hold that step's (ValueError: this ring has no sample buffer)."""
        if self._sample is None:
            raise ValueError("this ring has no sample buffer")
        if self._header[self.slots] != step_index + 1:
            raise TornRead(f"the sample buffer holds step {int(self._header[self.slots]) - 1}, not {step_index}")
        sample = self._sample.clone()
        if self._header[self.slots] != step_index + 1:
            raise TornRead(f"the sample of step {step_index} was overwritten while it was read")
        return sample

    def to_pb(self) -> controlnet_pb2.ResidualRing:
        return controlnet_pb2.ResidualRing(
            transport=SHARED_MEMORY,
            name=self.name,
            slots=self.slots,
            slot_bytes=self.layout.slot_bytes,
            header_bytes=self.header_bytes,
            tensors=self.layout.to_pb(),
            sample=None if self.sample_layout is None else self.sample_layout.to_pb(),
        )

    def unlink(self) -> None:
        """Remove the name (both sides keep their mapping): nothing can be left behind from now on."""
        if self._linked:
            self._linked = False
            (SHM_DIR / self.name).unlink(missing_ok=True)

    # -- reader --------------------------------------------------------------------------------

    @classmethod
    def attach(cls, ring: controlnet_pb2.ResidualRing) -> ShmRing:
        """Map the writer's ring; OSError or ValueError when it cannot be (another host, bad layout)."""
        check_name(ring.name, "residual ring")
        layout = SlotLayout.from_pb(ring)
        if ring.header_bytes != aligned(8 * (ring.slots + 1)):
            raise ValueError("unexpected ring header size")
        fd = os.open(SHM_DIR / ring.name, os.O_RDWR)
        ring = cls(ring.name, fd, layout, ring.slots, owner=False, sample=sample_layout(ring))
        # Mapped on both sides now: without its name nothing outlives the two processes.
        (SHM_DIR / ring.name).unlink(missing_ok=True)
        return ring

    def is_offered_as(self, ring: controlnet_pb2.ResidualRing) -> bool:
        """Whether the writer's offer `ring` describes this ring (kept mapped from an earlier
        session, under the same name) as it is mapped here."""
        try:
            layout, sample = SlotLayout.from_pb(ring), sample_layout(ring)
        except ValueError:
            return False
        same_slots = ring.slots == self.slots and ring.header_bytes == self.header_bytes
        return ring.name == self.name and same_slots and layout == self.layout and sample == self.sample_layout

    def read(self, slot: controlnet_pb2.ResidualSlot, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """The slot's residuals on `device` in `dtype`; TornRead if the slot does not hold the
        announced step.

        In the ring's own dtype on the CPU they are the slot itself, not copies (read-only use):
        valid until the reader has sent the input of the step after next, since the writer fills a
        slot again only when asked for that step (two slots). Otherwise they are converted
        copies, and the slot is checked again after the copy."""
        check_index(slot, self.slots)
        if self._header[slot.index] != slot.sequence:
            raise TornRead(f"residual slot {slot.index} holds step {self._header[slot.index]}, not {slot.sequence}")
        views = self._views[slot.index]
        device = torch.device(device)
        if device.type == "cpu" and all(v.dtype == dtype for v in views):
            return list(views)
        if device.type == "cuda":
            out = self._to_gpu(views, device, dtype)
        else:
            out = [view.to(device=device, dtype=dtype, copy=True) for view in views]
        if self._header[slot.index] != slot.sequence:
            raise TornRead(f"residual slot {slot.index} was overwritten while it was read")
        return out

    def write_sample(self, sample: torch.Tensor, step_index: int) -> bool:
        """Put the step's sample in the sample buffer (marked as being written meanwhile); False
        when this ring has none or the sample does not fit it as it is: send its bytes instead."""
        if self._sample is None or not self.sample_layout.fits(sample):
            return False
        if sample.is_cuda:
            self._pin(sample.device)
        self._header[self.slots] = 0
        self._sample.copy_(sample)  # from a GPU: the copy is done when this returns
        self._header[self.slots] = step_index + 1
        return True

    def _to_gpu(self, views: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Copies of `views` on the GPU, done when this returns (the slot may be refilled once the
        step after next is asked for), made on a side stream that waits for nothing queued on
        the denoising loop's stream; the consumer marks them used on its stream (`record_stream`)."""
        self._pin(device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(self._copy_stream):
            out = [view.to(device=device, dtype=dtype, non_blocking=True) for view in views]
        self._copy_stream.synchronize()  # only these copies: the stream is this ring's
        return out

    def _pin(self, device: torch.device) -> None:
        """Page-lock this process's mapping for GPU copies, once (portable: pinned for every GPU,
        as NCCL registers its shared memory); if the driver refuses, copies stay pageable,
        slower but the same."""
        if self._pinned is not None:
            return
        base = torch.frombuffer(self._map, dtype=torch.uint8)
        address, size = base.data_ptr(), base.numel()
        del base
        cudart = torch.cuda.cudart()
        with torch.cuda.device(device):  # no context on another GPU
            error = cudart.cudaHostRegister(address, size, CUDA_HOST_REGISTER_PORTABLE)
        self._pinned = address if error == cudart.cudaError.success else 0
        self._pinned_on = device
        if not self._pinned:
            _clear_last_cuda_error()
            log.warning(
                "residual ring %s: cannot page-lock %d bytes (CUDA error %d, %s): pageable copies",
                self.name,
                size,
                int(error),
                cudart.cudaGetErrorString(error),
            )

    # -- both ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap (and, for the writer, remove the name if still there)."""
        if self._owner:
            self.unlink()
        if self._pinned:
            cudart = torch.cuda.cudart()
            with torch.cuda.device(self._pinned_on):  # closed on any thread (idle.py): no context on GPU 0
                error = cudart.cudaHostUnregister(self._pinned)  # before the pages are unmapped
            if error != cudart.cudaError.success:  # left set, it would fail this thread's next kernel
                _clear_last_cuda_error()
                log.warning("residual ring %s: cannot unpin it (CUDA error %d)", self.name, int(error))
        self._pinned = 0
        self._views, self._header, self._sample = [], None, None
        try:
            self._map.close()
        except BufferError:  # a tensor still views it: the mapping goes with the last of them
            log.debug("residual ring %s still viewed at close", self.name)


CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable


def _clear_last_cuda_error() -> None:
    """Reset the CUDA runtime's last error (cudaGetLastError) after a refused registration: torch
    checks it after each kernel launch, so it would fail the next one on this thread (torch's
    binding of cudaHostRegister does not clear it). The runtime is the libcudart torch loaded."""
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libcudart" in line), None)
        ctypes.CDLL(path).cudaGetLastError()  # path None: the process's global symbols
    except (OSError, AttributeError) as exc:
        log.warning("cannot reset the CUDA runtime's last error (%s): the next kernel launch may fail", exc)


def remove_abandoned() -> list[str]:
    """Remove rings whose creator process is gone (killed before the reader mapped them)."""
    removed = []
    try:
        entries = list(SHM_DIR.glob(f"{PREFIX}*"))
    except OSError:
        return removed
    for path in entries:
        pid, _, started = path.name[len(PREFIX) :].split("-", 1)[0].partition(".")
        if not pid.isdigit():
            continue
        if _alive(int(pid)):
            now = _start_time(int(pid))
            if not started or now is None or now == started:
                continue  # its owner lives (or cannot be told from a newer process here): kept
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            pass
    if removed:
        log.info("removed %d abandoned residual ring(s) from %s", len(removed), SHM_DIR)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
