"""What both residual rings share: where each residual lies in a slot, as planned by the writer and
checked by the reader, where the step's sample lies (the other direction), and the error for a slot
that does not hold its announced step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import torch

from swiftd import codec
from swiftd.errors import ServingError
from swiftd.v1 import controlnet_pb2

ALIGN = 64  # bytes: every tensor, and the shared-memory header, start on a cache line
SLOTS = 2  # the writer refills a slot only when asked for the step after next


class TornRead(ServingError):
    """A slot did not hold the step it was announced with (overwritten or half-written)."""

    code = grpc.StatusCode.DATA_LOSS


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Layout:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the slot

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` can be written here as it is (same shape and dtype: no cast)."""
        return tuple(tensor.shape) == self.shape and tensor.dtype == self.dtype

    def to_pb(self) -> controlnet_pb2.TensorLayout:
        return controlnet_pb2.TensorLayout(dtype=codec.dtype_to_proto(self.dtype), shape=self.shape, offset=self.offset)

    @classmethod
    def from_pb(cls, t: controlnet_pb2.TensorLayout) -> Layout:
        return cls(codec.dtype_from_proto(t.dtype), tuple(t.shape), t.offset)


@dataclass(frozen=True)
class SlotLayout:
    tensors: tuple[Layout, ...]
    slot_bytes: int

    @classmethod
    def plan(cls, tensors: list[torch.Tensor], wire_dtype: torch.dtype | None) -> SlotLayout:
        """The writer's: `tensors` one after another (cast to `wire_dtype`), each aligned."""
        layouts, offset = [], 0
        for tensor in tensors:
            layout = Layout(wire_dtype or tensor.dtype, tuple(tensor.shape), offset)
            layouts.append(layout)
            offset += aligned(layout.nbytes)
        return cls(tuple(layouts), max(offset, ALIGN))

    @classmethod
    def from_pb(cls, ring: controlnet_pb2.ResidualRing) -> SlotLayout:
        """The reader's, from the writer's offer; ValueError for one that does not fit its slots."""
        if ring.slots < 1:
            raise ValueError(f"a residual ring needs a slot, not {ring.slots}")
        layouts = []
        for t in ring.tensors:
            layout = Layout.from_pb(t)
            if layout.offset % ALIGN or layout.offset + layout.nbytes > ring.slot_bytes:
                raise ValueError(f"tensor at {layout.offset} does not fit a slot of {ring.slot_bytes} bytes")
            layouts.append(layout)
        return cls(tuple(layouts), ring.slot_bytes)

    def to_pb(self) -> list[controlnet_pb2.TensorLayout]:
        return [t.to_pb() for t in self.tensors]

    def fits(self, tensors: list[torch.Tensor]) -> bool:
        return len(tensors) == len(self.tensors) and all(
            tuple(t.shape) == layout.shape for t, layout in zip(tensors, self.tensors)
        )


def check_index(slot: controlnet_pb2.ResidualSlot, slots: int) -> int:
    if not 0 <= slot.index < slots:
        raise TornRead(f"residual slot {slot.index} out of range (ring of {slots})")
    return slot.index


def sample_layout(ring: controlnet_pb2.ResidualRing) -> Layout | None:
    """The reader's view of the ring's sample buffer (None: samples go as bytes); ValueError for
    one whose offset is not aligned."""
    if not ring.HasField("sample"):
        return None
    layout = Layout.from_pb(ring.sample)
    if layout.offset % ALIGN or not layout.shape:
        raise ValueError(f"bad sample layout at offset {layout.offset}, shape {layout.shape}")
    return layout
