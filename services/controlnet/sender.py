"""One session's residuals as ResidualsResponse messages, over the transport the stream negotiated
(swiftd/transport): inline bytes, or a ring the UNet worker has mapped, written in place."""

from __future__ import annotations

import logging

import torch

from swiftd import codec, transport
from swiftd.v1 import common_pb2, controlnet_pb2

log = logging.getLogger(__name__)


class ResidualSender:
    def __init__(self, chosen: int, wire_dtype: int, label: str):
        """`chosen`: the transport picked for this stream (transport.choose); `wire_dtype`: the
        session's (DTYPE_UNSPECIFIED keeps the residuals' dtype); `label`: for log lines."""
        self.chosen = chosen
        self.wire_dtype = wire_dtype
        self.label = label
        self._ring = None  # transport.ring_class(chosen), once offered
        self._offered = chosen == transport.INLINE  # nothing to offer when inline was chosen
        self.used = transport.INLINE  # what the last step went over

    def response(
        self, step: controlnet_pb2.StepInput, residuals: list[torch.Tensor], compute_seconds: float
    ) -> controlnet_pb2.ResidualsResponse:
        """Step `step`'s residuals (down blocks, then mid block), as the peer reads them now."""
        response = controlnet_pb2.ResidualsResponse(step_index=step.step_index, compute_seconds=compute_seconds)
        ring = self._ring
        if ring is not None and step.transport == transport.INLINE:
            log.warning("%s: the UNet worker could not map the residual ring: inline bytes instead", self.label)
            self._close_ring()
        elif ring is not None and step.transport == self.chosen:
            ring.unlink()  # both sides have it mapped: from now on a kill leaves nothing in /dev/shm
            if ring.fits(residuals):
                response.slot.CopyFrom(ring.write(residuals))
                self.used = self.chosen
                return response
        self._inline(response, residuals)
        if not self._offered:  # the first step: offer the ring for the next ones
            self._offered = True
            self._offer(response, residuals)
        return response

    def _inline(self, response, residuals: list[torch.Tensor]) -> None:
        *down, mid = residuals
        wire = self.wire_dtype
        if wire == common_pb2.DTYPE_UNSPECIFIED and mid.is_cuda:
            wire = common_pb2.DTYPE_FLOAT16  # GPU residuals through host memory: half the bytes
        response.down_block_res_samples.extend(codec.tensor_to_proto(r, wire) for r in down)
        response.mid_block_res_sample.CopyFrom(codec.tensor_to_proto(mid, wire))
        self.used = transport.INLINE

    def _offer(self, response, residuals: list[torch.Tensor]) -> None:
        wire = codec.dtype_from_proto(self.wire_dtype, allow_unspecified=True)
        try:
            self._ring = transport.ring_class(self.chosen).create(residuals, wire)
        except (OSError, RuntimeError) as exc:  # /dev/shm full, CUDA IPC refused: this stream stays inline
            log.warning("%s: no residual ring (%s): inline bytes", self.label, exc)
            return
        response.ring.CopyFrom(self._ring.to_pb())

    def _close_ring(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def close(self) -> None:
        self._close_ring()
