"""One residual session's transport on the ControlNet worker: how its step inputs arrive and its
residuals leave, over what the stream negotiated (swiftd/transport).

Inline, everything stays in the gRPC stream. With a ring, the first step's residuals go into the
ring's first slot, announced with the ring's offer (a UNet worker that cannot map it asks for that
step again, inline). Once the UNet worker has answered that it mapped the ring and connected to
its step socket, each step's residuals are computed straight into the next slot, each step's
sample arrives in the ring's sample buffer, and the per-step messages move to the step socket
until the UNet worker closes it. A shared-memory ring whose session ended cleanly is kept for the
next session with the same UNet worker (swiftd/transport/idle.py).
"""

from __future__ import annotations

import logging

import torch

from swiftd import codec, metrics, transport
from swiftd.errors import InvalidArgument
from swiftd.transport.idle import IdleRings
from swiftd.transport.step_socket import StepListener
from swiftd.v1 import common_pb2, controlnet_pb2

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT_S = 10.0  # the UNet worker connects before it answers the offer: this is never waited
POLL_S = 1.0  # how often a session waiting for its next step checks that its RPC is still alive


class SessionChannel:
    def __init__(self, chosen: int, wire_dtype: int, label: str, context, idle: IdleRings | None = None, idle_names=()):
        """`chosen`: the transport picked for this stream (transport.choose); `wire_dtype`: the
        session's (DTYPE_UNSPECIFIED keeps the residuals' dtype); `label`: for log lines;
        `context`: the RPC's (a session waiting on its socket ends when the RPC does); `idle`:
        this worker's rings kept from earlier sessions, `idle_names` those the UNet worker keeps
        (SessionStart.idle_rings): one in both that fits is offered instead of a new one."""
        self.chosen = chosen
        self.wire_dtype = wire_dtype
        self.label = label
        self._context = context
        self._idle = idle if chosen == transport.SHARED_MEMORY else None
        self._idle_names = list(idle_names)
        self.reused = False  # the ring offered was kept from an earlier session
        self._keep = False  # the UNet worker got every step and keeps the ring mapped
        self._ring = None  # transport.ring_class(chosen), once offered
        self._listener: StepListener | None = None  # the ring's step socket until the peer connects
        self._socket = None  # connected: the ring is in use and steps go over it
        self._first_sample: torch.Tensor | None = None  # the ring (slots, sample buffer) is planned for it
        self._filling: list[torch.Tensor] | None = None  # the slot the step being computed goes into
        self._offered = chosen == transport.INLINE  # nothing to offer when inline was chosen
        self.used = transport.INLINE  # what the last step went over
        # How the last step's residuals left: computed in place in a ring slot, copied into one,
        # or as bytes in a message.
        self.residuals_via = "bytes"

    # -- step inputs ---------------------------------------------------------------------------

    def step_inputs(self, request_iterator):
        """The session's StepInputs: from the stream until the UNet worker takes the ring, then
        from the step socket until it closes that (or the RPC ends)."""
        for message in request_iterator:
            if message.WhichOneof("kind") != "step":
                raise InvalidArgument("step", "only StepInput messages may follow the SessionStart")
            self._answered(message.step)
            yield message.step
            if self._socket is not None:
                break
        while self._socket is not None:
            step = self._receive()
            if step is None:
                return
            if step.keep_ring:  # the session's last message: no step
                self._keep = True
                return
            yield step

    def _answered(self, step: controlnet_pb2.StepInput) -> None:
        if self._ring is None or self._socket is not None:
            return
        if step.transport == transport.INLINE:
            log.warning("%s: the UNet worker could not map the residual ring: inline bytes instead", self.label)
            self._close_ring()
        elif step.transport == self.chosen:
            try:
                self._socket = self._listener.accept(ACCEPT_TIMEOUT_S)
            except OSError as exc:
                raise InvalidArgument(
                    "step.transport", "the ring was taken without connecting to its step socket"
                ) from exc
            self._ring.unlink()  # both sides have it mapped: from now on a kill leaves nothing in /dev/shm
            self._listener.close()
            self._listener = None

    def _receive(self) -> controlnet_pb2.StepInput | None:
        while True:
            try:
                return self._socket.receive(controlnet_pb2.StepInput, POLL_S)
            except TimeoutError:
                if not self._context.is_active():
                    return None
            except ValueError as exc:  # a message that does not parse
                raise InvalidArgument("step", f"bad message on the step socket: {exc}") from exc

    def sample(self, step: controlnet_pb2.StepInput) -> torch.Tensor:
        """The step's sample: from the ring's sample buffer when the message says it is there,
        else from its bytes. INVALID_ARGUMENT naming the field when neither can be."""
        if step.sample_in_ring:
            if self._socket is None or self._ring.sample_layout is None:
                raise InvalidArgument("step.sample_in_ring", "this session has no ring with a sample buffer")
            return self._ring.read_sample(step.step_index)
        sample = codec.tensor_from_field(step.sample, "step.sample")
        if self._first_sample is None:
            self._first_sample = sample
        return sample

    # -- residuals -----------------------------------------------------------------------------

    def slot(self, sample: torch.Tensor, device: torch.device) -> list[torch.Tensor] | None:
        """Where the residuals of the step with this `sample` go (a ring slot, for
        ControlNetStepper.step's `out`), or None: fresh tensors, sent as `respond` decides."""
        if self._socket is None or sample.shape != self._first_sample.shape:
            return None
        self._filling = self._ring.next_slot()
        if self._filling[0].device != torch.device(device):
            return None  # CUDA residuals into a host-memory ring: respond copies them in
        return self._filling

    def respond(
        self, step: controlnet_pb2.StepInput, residuals: list[torch.Tensor], compute_seconds: float
    ) -> controlnet_pb2.ResidualsResponse | None:
        """The step's ResidualsResponse to yield on the stream, or None: sent over the step socket."""
        response = controlnet_pb2.ResidualsResponse(step_index=step.step_index, compute_seconds=compute_seconds)
        if self._socket is None:
            if not self._offered:  # the first step: its residuals in the ring offered with them
                self._offered = True
                if self._offer(response, residuals):
                    response.slot.CopyFrom(self._ring.write(residuals))
                    self.used, self.residuals_via = self.chosen, "copied"
                    return response
            self._inline(response, residuals)
            return response
        if self._filling is not None:
            views, self._filling = self._filling, None
            self.residuals_via = "in_place"
            for view, residual in zip(views, residuals):
                if view.data_ptr() != residual.data_ptr():
                    view.copy_(residual)
                    self.residuals_via = "copied"
            response.slot.CopyFrom(self._ring.commit())
            self.used = self.chosen
        elif self._ring.fits(residuals):
            response.slot.CopyFrom(self._ring.write(residuals))
            self.used, self.residuals_via = self.chosen, "copied"
        else:
            self._inline(response, residuals)
        try:
            self._socket.send(response)
        except OSError as exc:  # the UNet worker is gone: the next read ends the session
            log.debug("%s: step socket closed by the peer (%s)", self.label, exc)
        return None

    def _inline(self, response, residuals: list[torch.Tensor]) -> None:
        *down, mid = residuals
        wire = self.wire_dtype
        if wire == common_pb2.DTYPE_UNSPECIFIED and mid.is_cuda:
            wire = common_pb2.DTYPE_FLOAT16  # GPU residuals through host memory: half the bytes
        response.down_block_res_samples.extend(codec.tensor_to_proto(r, wire) for r in down)
        response.mid_block_res_sample.CopyFrom(codec.tensor_to_proto(mid, wire))
        self.used, self.residuals_via = transport.INLINE, "bytes"

    def _offer(self, response, residuals: list[torch.Tensor]) -> bool:
        wire = codec.dtype_from_proto(self.wire_dtype, allow_unspecified=True)
        kept = None
        if self._idle is not None:
            kept = self._idle.take_first(self._idle_names, lambda r: r.serves(residuals, wire, self._first_sample))
        try:
            if kept is not None:
                self._ring, self.reused = kept.reuse(residuals), True
            else:
                self._ring = self._new_ring(residuals, wire)
            self._listener = StepListener()
        except (OSError, RuntimeError) as exc:  # /dev/shm full, CUDA IPC refused: this stream stays inline
            log.warning("%s: no residual ring (%s): inline bytes", self.label, exc)
            self._close_ring()
            return False
        response.ring.CopyFrom(self._ring.to_pb())
        response.ring.step_socket = self._listener.name
        if self._idle is not None:
            response.ring.keepable = True
            held = set(self._idle.names())
            response.ring.not_kept.extend(n for n in self._idle_names if n not in held and n != self._ring.name)
        metrics.RESIDUAL_RINGS.labels(transport.name(self.chosen), "reused" if self.reused else "new").inc()
        return True

    def _new_ring(self, residuals: list[torch.Tensor], wire: torch.dtype | None):
        ring_class = transport.ring_class(self.chosen)
        try:
            return ring_class.create(residuals, wire, sample=self._first_sample)
        except OSError:
            if self._idle is None or not len(self._idle):
                raise
            # /dev/shm full: let go of the rings kept idle here (those the UNet worker still maps
            # are freed once it hears they are not kept) and try once more.
            log.info("%s: no room for a new ring: letting go of %d idle ring(s)", self.label, len(self._idle))
            self._idle.clear()
            return ring_class.create(residuals, wire, sample=self._first_sample)

    def _close_ring(self) -> None:
        for part in (self._socket, self._listener, self._ring):
            if part is not None:
                part.close()
        self._socket = self._listener = self._ring = None

    def close(self) -> None:
        """End the session's transport. A ring the UNet worker asked to keep is kept (after the
        session's last write: nothing writes it until it is offered again), and the UNet worker
        told so (`ring_kept`: it keeps its mapping only then)."""
        if self._keep and self._idle is not None and self._ring is not None:
            ring, self._ring = self._ring, None
            self._idle.put(ring)
            try:
                self._socket.send(controlnet_pb2.ResidualsResponse(ring_kept=True))
            except OSError:  # the UNet worker is gone: it keeps nothing, nor does this side
                self._idle.take(ring.name)
                ring.close()
        self._close_ring()
