"""A ring of residual buffers on a GPU, shared with the UNet worker over CUDA IPC.

The ControlNet worker allocates two slots (one flat device buffer each) when its stream has
negotiated CUDA_IPC, and shares, once, each slot's memory handle and two interprocess events:

    ready[slot]   recorded by the writer after it copied a step's residuals into the slot
    free[slot]    recorded by the reader after it copied them out

The writer makes its stream wait on free[slot] before it fills the slot again, and the reader's
copy stream waits on ready[slot] before it copies: the GPUs order the two processes' work, with no
host synchronisation and no copy through host memory. The step inputs go the other way the same
way: a sample buffer, shaped as the sample the ring was offered with, that the UNet worker writes
behind sample_free and marks with sample_ready, and the ControlNet worker copies out behind
sample_ready and releases with sample_free; the step message then carries only the step's number
and timestep, so neither side waits for its GPU during a step. The reader copies out on a stream of its
own (device to device, tens of microseconds for an SDXL step's 107 MB) so that the slot is free
again at once, and hands the copies to the denoising loop's stream behind an event.

The handles travel as JSON (never pickle: they come from another process). Nothing outlives the
two processes: CUDA frees IPC memory with the last process that maps it, and torch's IPC reference
counting keeps the writer's buffers until the reader has let go.

Only a GPU exercises this path (tests/test_residual_transport.py skips it elsewhere; the GPU run
script is bench/gpu_serve.py).
"""

from __future__ import annotations

import base64
import json
import logging
import time

import torch

from swiftd.device import gpu_uuid, wait_for_gpu
from swiftd.transport import CUDA_IPC
from swiftd.transport.layout import SLOTS, Layout, SlotLayout, TornRead, check_index, sample_layout
from swiftd.v1 import controlnet_pb2

log = logging.getLogger(__name__)
CLOSE_WAIT_S = 5.0  # for the reader's queued copies before its ring's memory is let go
_kept: list = []  # rings whose queued copies never ran: never unmapped under them


def _encode_handle(shared: tuple) -> dict:
    device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = shared
    b64 = lambda b: None if b is None else base64.b64encode(b).decode()  # noqa: E731  (None stays None)
    return {
        "device": device,
        "handle": b64(handle),
        "size": size,
        "offset": offset,
        "ref_handle": b64(ref_handle),
        "ref_offset": ref_offset,
        "event_handle": b64(event_handle),
        "event_sync": bool(event_sync),
    }


def _decode_handle(entry: dict) -> tuple:
    raw = lambda s: None if s is None else base64.b64decode(s)  # noqa: E731
    return (
        int(entry["device"]),
        raw(entry["handle"]),
        int(entry["size"]),
        int(entry["offset"]),
        raw(entry["ref_handle"]),
        int(entry["ref_offset"]),
        raw(entry["event_handle"]),
        bool(entry["event_sync"]),
    )


def visible_gpus() -> list[str]:
    """The UUIDs of the GPUs this process sees (where the driver tells them)."""
    uuids = [gpu_uuid(index) for index in range(torch.cuda.device_count())]
    return [u for u in uuids if u is not None]


def local_index(uuid: str | None, index: int) -> int:
    """This process's index of the GPU the writer calls `index` and whose UUID is `uuid`. The two
    processes may number their GPUs differently (CUDA_VISIBLE_DEVICES per container); a GPU this
    process cannot see is a RuntimeError, so the ring is declined and another transport used."""
    if uuid is None:
        return index  # a writer that could not tell: assume one numbering
    for local in range(torch.cuda.device_count()):
        if gpu_uuid(local) == uuid:
            return local
    raise RuntimeError(f"GPU {uuid} is not visible to this process")


def _share(buffer: torch.Tensor, ready: torch.cuda.Event, free: torch.cuda.Event) -> bytes:
    """JSON with the IPC handles of a buffer and its two events, and its GPU's UUID."""
    entry = {
        "gpu_uuid": gpu_uuid(buffer.device.index),
        "buffer": _encode_handle(buffer.untyped_storage()._share_cuda_()),
        "storage_offset": buffer.storage_offset(),
        "ready": base64.b64encode(ready.ipc_handle()).decode(),
        "free": base64.b64encode(free.ipc_handle()).decode(),
    }
    return json.dumps(entry).encode()


def _open(blob: bytes, nbytes: int) -> tuple[torch.Tensor, torch.cuda.Event, torch.cuda.Event]:
    """The buffer (`nbytes` long) and its two events that `_share` described."""
    entry = json.loads(blob)
    shared = _decode_handle(entry["buffer"])
    index = local_index(entry.get("gpu_uuid"), shared[0])
    shared = (index, *shared[1:])
    device = torch.device("cuda", index)
    storage = torch.UntypedStorage._new_shared_cuda(*shared)
    base = torch.empty(0, dtype=torch.uint8, device=device)
    base.set_(storage, int(entry["storage_offset"]), (nbytes,), (1,))
    ready = torch.cuda.Event.from_ipc_handle(device, base64.b64decode(entry["ready"]))
    free = torch.cuda.Event.from_ipc_handle(device, base64.b64decode(entry["free"]))
    return base, ready, free


def _ipc_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)


def _view(buffer: torch.Tensor, layout: Layout) -> torch.Tensor:
    return buffer[layout.offset : layout.offset + layout.nbytes].view(layout.dtype).view(layout.shape)


class CudaIpcRing:
    """One session's device ring; `create` on the writer's side, `attach` on the reader's."""

    def __init__(self, buffers: list[torch.Tensor], layout: SlotLayout, ready, free, sample=None):
        """`sample`: (layout, buffer, ready event, free event) of the sample buffer, or None."""
        self.layout = layout
        self.slots = len(buffers)
        self._buffers = buffers
        self._ready, self._free = ready, free
        self.sample_layout, self._sample_buffer, self._sample_ready, self._sample_free = sample or (None,) * 4
        self._sample = None if sample is None else _view(self._sample_buffer, self.sample_layout)
        self._views = [[_view(buffer, tensor) for tensor in layout.tensors] for buffer in buffers]
        self._sequence = 0
        self._sample_step = -1  # the writer's: the last step whose sample it read
        self._copy_stream = None  # the reader's

    # -- writer --------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        tensors: list[torch.Tensor],
        wire_dtype: torch.dtype | None,
        sample: torch.Tensor | None = None,
        slots: int = SLOTS,
    ) -> CudaIpcRing:
        """A ring whose slots fit `tensors` (cast to `wire_dtype`), with a sample buffer on the
        same device that fits `sample` (the step input the ring is offered with)."""
        device = tensors[0].device
        if device.type != "cuda":
            raise RuntimeError("a CUDA IPC ring needs CUDA tensors")
        layout = SlotLayout.plan(tensors, wire_dtype)
        buffers = [torch.empty(layout.slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)]
        ready, free = [_ipc_event() for _ in range(slots)], [_ipc_event() for _ in range(slots)]
        sample_part = None
        if sample is not None:
            sample_layout = Layout(sample.dtype, tuple(sample.shape), 0)
            buffer = torch.empty(sample_layout.nbytes, dtype=torch.uint8, device=device)
            sample_part = (sample_layout, buffer, _ipc_event(), _ipc_event())
        return cls(buffers, layout, ready, free, sample_part)

    def fits(self, tensors: list[torch.Tensor]) -> bool:
        return self.layout.fits(tensors)

    def next_slot(self) -> list[torch.Tensor]:
        """The next slot's tensors: work the current stream queues into them after this call runs
        after the reader's copy of what the slot held; then `commit`."""
        self._sequence += 1
        index = (self._sequence - 1) % self.slots
        torch.cuda.current_stream(self._buffers[index].device).wait_event(self._free[index])
        return self._views[index]

    def commit(self) -> controlnet_pb2.ResidualSlot:
        """Record the slot's ready event behind the work that filled it; its address."""
        index = (self._sequence - 1) % self.slots
        self._ready[index].record(torch.cuda.current_stream(self._buffers[index].device))
        return controlnet_pb2.ResidualSlot(index=index, sequence=self._sequence)

    def write(self, tensors: list[torch.Tensor]) -> controlnet_pb2.ResidualSlot:
        for view, tensor in zip(self.next_slot(), tensors):
            view.copy_(tensor, non_blocking=True)
        return self.commit()

    def read_sample(self, step_index: int) -> torch.Tensor:
        """A copy of the step's sample the UNet worker wrote, on this device, ordered after its
        write by sample_ready; the buffer is released (sample_free) behind the copy. The events
        order the two processes' work on the GPU, given that each step's sample is asked for once
        and in order, which is checked here (TornRead otherwise)."""
        if self._sample is None:
            raise ValueError("this ring has no sample buffer")
        if step_index <= self._sample_step:
            raise TornRead(f"the sample of step {step_index} after that of step {self._sample_step}")
        self._sample_step = step_index
        stream = torch.cuda.current_stream(self._sample.device)
        stream.wait_event(self._sample_ready)
        sample = self._sample.clone()
        self._sample_free.record(stream)
        return sample

    def to_pb(self) -> controlnet_pb2.ResidualRing:
        # torch creates an event when it is first used: here, on the buffers' device.
        with torch.cuda.device(self._buffers[0].device):
            ring = controlnet_pb2.ResidualRing(
                transport=CUDA_IPC,
                slots=self.slots,
                slot_bytes=self.layout.slot_bytes,
                tensors=self.layout.to_pb(),
                cuda_handles=[_share(*parts) for parts in zip(self._buffers, self._ready, self._free)],
            )
            if self._sample is not None:
                ring.sample.CopyFrom(self.sample_layout.to_pb())
                ring.cuda_sample = _share(self._sample_buffer, self._sample_ready, self._sample_free)
        return ring

    def unlink(self) -> None:
        """Nothing to remove: CUDA frees the memory with the last process mapping it."""

    # -- reader --------------------------------------------------------------------------------

    @classmethod
    def attach(cls, ring: controlnet_pb2.ResidualRing) -> CudaIpcRing:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available in this process")
        layout = SlotLayout.from_pb(ring)
        if len(ring.cuda_handles) != ring.slots:
            raise ValueError("a CUDA IPC ring needs one handle per slot")
        buffers, ready, free = [], [], []
        for blob in ring.cuda_handles:
            base, ready_event, free_event = _open(blob, ring.slot_bytes)
            buffers.append(base)
            ready.append(ready_event)
            free.append(free_event)
        sample = sample_layout(ring)
        sample_part = None
        if sample is not None:
            if not ring.cuda_sample:
                raise ValueError("a CUDA IPC ring with a sample layout needs the sample buffer's handles")
            sample_part = (sample, *_open(ring.cuda_sample, sample.offset + sample.nbytes))
        return cls(buffers, layout, ready, free, sample_part)

    def read(self, slot: controlnet_pb2.ResidualSlot, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Copies of the slot's residuals on `device` in `dtype`, ordered after the writer's
        copy by its event; the slot is released (free event) as soon as they are made. The
        consuming stream must wait on the returned list's `event` before using them (the reader
        thread returns before the copies are done), and mark them used there (`record_stream`:
        they were made on the ring's side stream)."""
        check_index(slot, self.slots)
        stream = self._stream()
        with torch.cuda.stream(stream):
            stream.wait_event(self._ready[slot.index])
            out = [view.to(device=device, dtype=dtype, copy=True) for view in self._views[slot.index]]
            self._free[slot.index].record(stream)
            copied = torch.cuda.Event()
            copied.record(stream)
        return _Ordered(out, copied)

    def write_sample(self, sample: torch.Tensor, step_index: int) -> bool:
        """Queue the step's sample into the sample buffer behind the ControlNet worker's copy of
        the last one (sample_free), and mark it with sample_ready; no host synchronisation. False
        when this ring has no sample buffer or the sample does not fit it (another shape, dtype
        or device: the ControlNet on another GPU of the host): send its bytes."""
        if self._sample is None or not self.sample_layout.fits(sample) or sample.device != self._sample.device:
            return False
        made = torch.cuda.Event()
        made.record(torch.cuda.current_stream(sample.device))
        stream = self._stream()
        with torch.cuda.stream(stream):  # on the buffer's device, where its events belong
            stream.wait_event(made)
            stream.wait_event(self._sample_free)
            self._sample.copy_(sample, non_blocking=True)
            self._sample_ready.record(stream)
        sample.record_stream(stream)  # not reused by the allocator before the copy ran
        return True

    def _stream(self) -> torch.cuda.Stream:
        """The reader's side stream on the ring's device (copies out, samples in)."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self._buffers[0].device)
        return self._copy_stream

    # -- both ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Let go of the memory and events. The reader's side stream may still hold queued copies
        out of a slot or into the sample buffer (a request cancelled or failed over with steps
        queued): unmapping IPC memory under them would be an illegal access, which breaks the
        GPU context, so this waits for them, a bounded time (then keeps the ring mapped)."""
        stream = self._copy_stream
        if stream is not None:
            deadline = time.monotonic() + CLOSE_WAIT_S
            if not wait_for_gpu(stream, stop=lambda: time.monotonic() > deadline):
                log.warning("CUDA IPC ring: copies still queued %.0f s after its session: kept mapped", CLOSE_WAIT_S)
                _kept.append((self._buffers, self._sample_buffer))
        self._views, self._buffers, self._sample = [], [], None
        self._sample_buffer = self._ready = self._free = self._sample_ready = self._sample_free = None
        self._copy_stream = None


class _Ordered(list):
    """The copied residuals and `event`, which the consuming stream waits on before using them."""

    def __init__(self, tensors, event):
        super().__init__(tensors)
        self.event = event
