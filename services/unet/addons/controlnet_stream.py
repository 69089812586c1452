"""A ControlNet worker as a residual source: one bidi stream per ControlNet of a request.

`RemoteResidualSource.start_step` only queues the step's input for gRPC's sender, so the UNet's
encoder half runs while the ControlNet worker computes; a reader thread receives and decodes the
residuals meanwhile, and `wait_step` hands them over. Once the worker's residual ring is mapped,
the step inputs (sent by the denoising loop's thread itself) and the announcements of filled
slots go over the ring's step socket instead (swiftd/transport/step_socket.py); a shared-memory
ring whose session got every step stays mapped for the next session with the same worker
(swiftd/transport/idle.py). A dead worker
surfaces as UNAVAILABLE, a slow one as DEADLINE_EXCEEDED (the stream carries the request's
deadline, and no step waits longer than `step_timeout`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import grpc
import torch

from swiftd import codec, transport
from swiftd.controlnet_step import ControlNetResiduals, ControlNetSession
from swiftd.errors import DeadlineExceeded, Unavailable, from_rpc_error
from swiftd.request import wire_dtype_to_pb
from swiftd.transport.idle import IdleRings
from swiftd.transport.shm import ShmRing
from swiftd.transport.step_socket import StepSocket
from swiftd.v1 import common_pb2, controlnet_pb2, controlnet_pb2_grpc

_END = object()
CALL_CHECK_S = 0.25  # how often a reader waiting on the step socket looks whether its call ended
READER_STOP_S = 5.0  # longest wait at close for the reader to stop (else the ring goes to the GC)
SET_ASIDE = 2  # idle rings of a worker a session lists (one fits unless the request's size changed)
KEEP_WAIT_S = 1.0  # longest wait at close for the worker to say it keeps the ring (else it is freed)
log = logging.getLogger(__name__)
#: This process's shared-memory rings kept mapped between sessions, offered again by their writers.
IDLE_RINGS = IdleRings()


class RemoteResidualSource:
    def __init__(
        self,
        channel: grpc.Channel,
        address: str,
        session: ControlNetSession,
        wire_dtype: str,
        request_id: str,
        timeout: float | None,
        step_timeout: float,
        out_dtype: torch.dtype,
        out_device: torch.device,
        transports: tuple[int, ...] = (),
    ):
        """`transports`: the residual transports besides inline to offer, fastest first."""
        self.address = address
        self.controlnet_id = session.controlnet_id
        self.where = f"controlnet {self.controlnet_id!r} on {address}"  # for errors and log lines
        self._step_timeout = step_timeout
        self._out_dtype, self._out_device = out_dtype, out_device
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._sent_at: dict[int, float] = {}
        # Summed over steps; the first step's transport also alone: it carries the session's set-up
        # (the SessionStart's decoding, the ring's creation and mapping), later ones only handoffs.
        self.stats = {"compute": 0.0, "transport": 0.0, "first_step_transport": 0.0, "steps": 0}
        self._ring = None  # the ControlNet worker's residual ring, once mapped
        self._socket: StepSocket | None = None  # its step socket, once connected
        self._on_socket = False  # the answer went out: step inputs go over the socket from now on
        self._last_input: controlnet_pb2.StepInput | None = None
        self._closing = threading.Lock()  # held to connect the socket, or to mark the source closed
        self._closed = False  # close() ran (set by it alone)
        # Set once the reader will copy nothing more out of the ring (it may still wait on the
        # stream, where a gRPC receive can hang: see _call_ended), so close() may close the ring.
        self._done_with_ring = threading.Event()
        self._answer = common_pb2.RESIDUAL_TRANSPORT_UNSPECIFIED  # to its ring offer, sent with each step
        self._failed = False  # a step failed: the ring is not kept for another session
        self._ring_kept = False  # the worker answered keep_ring: it keeps the ring too
        self._ring_keepable = False  # the worker's offer said it keeps rings
        self._set_aside: list[ShmRing] = []  # this process's idle rings of this worker, listed in the start
        self.transport = transport.INLINE  # how the last residuals arrived

        start = session.to_pb(wire_dtype_to_pb(wire_dtype), request_id)
        offered = transport.usable(transports, out_device.type)
        if offered:
            start.transports.extend(offered)
            start.host_identity = transport.host_identity()
        if transport.SHARED_MEMORY in offered:  # kept from earlier sessions with this worker: offered again?
            # Two at most: a request's other sessions with this worker (two ControlNets on it) get theirs.
            self._set_aside = IDLE_RINGS.take_all(address, limit=SET_ASIDE)
            start.idle_rings.extend(ring.name for ring in self._set_aside)
        if transport.CUDA_IPC in offered:  # a ControlNet worker that could not map it offers shared memory
            from swiftd.transport.cuda_ipc import visible_gpus

            start.gpu_uuids.extend(visible_gpus())
            start.pid_namespace = transport.pid_namespace()
        self._requests.put(controlnet_pb2.ResidualsRequest(start=start))
        stub = controlnet_pb2_grpc.ControlNetWorkerStub(channel)
        self._call = stub.StreamResiduals(iter(self._requests.get, _END), timeout=timeout)
        # gRPC can end a call (status set, done callbacks run) without ever completing the receive
        # its iterator waits in: grpcio 1.85 does, now and then, when the worker's GOAWAY comes
        # while the connection is being set up. The reader would then wait past the deadline, and
        # the step for `step_timeout`, the worker held all along; so the status also comes from here.
        self._call.add_done_callback(self._call_ended)
        self._reader = threading.Thread(target=self._read, name=f"residuals-{self.controlnet_id}", daemon=True)
        self._reader.start()

    def _call_ended(self, call: grpc.Future) -> None:
        if call.code() != grpc.StatusCode.OK:  # a normal end is the reader's to tell (it may have more)
            self._responses.put(from_rpc_error(call, self.where))

    def _read(self) -> None:
        try:
            for response in self._call:
                if response.HasField("ring") and not self._map_ring(response.ring):
                    self._requests.put(self._again_inline(response.step_index))
                    continue
                self._responses.put(self._unpack(response))
                if self._socket is not None:
                    break  # the next steps' residuals are announced on the step socket
            if self._socket is not None:
                self._read_socket()
                self._done_with_ring.set()  # what is left reads the stream only
                for _ in self._call:  # the socket closed, or the call ended: the stream says why
                    pass
            self._responses.put(self._ended_early())
        except grpc.RpcError as exc:
            self._responses.put(from_rpc_error(exc, self.where))
        except Exception as exc:  # noqa: BLE001 - surfaced on the request's thread
            self._responses.put(exc)
        finally:
            self._done_with_ring.set()

    def _read_socket(self) -> None:
        """Residuals announced on the step socket, until it closes or the call ends (its deadline
        passed, or it was cancelled: a worker that hangs must not hold the request past it)."""
        while True:
            try:
                response = self._socket.receive(controlnet_pb2.ResidualsResponse, CALL_CHECK_S)
            except TimeoutError:
                if self._call.done():
                    return
                continue
            if response is None:
                return
            if response.ring_kept:  # the worker's last message: it keeps the ring
                self._ring_kept = True
                continue
            self._responses.put(self._unpack(response))

    def _unpack(self, response: controlnet_pb2.ResidualsResponse) -> tuple:
        ready = None  # CUDA IPC: the event the loop's stream waits on before using them
        if response.HasField("slot"):
            tensors = self._ring.read(response.slot, self._out_device, self._out_dtype)
            ready = getattr(tensors, "event", None)
            *down, mid = tensors
            residuals = ControlNetResiduals(tuple(down), mid)
            self.transport = self._answer
        else:
            residuals = ControlNetResiduals(
                tuple(self._decode(t) for t in response.down_block_res_samples),
                self._decode(response.mid_block_res_sample),
            )
            self.transport = transport.INLINE
        return response.step_index, response.compute_seconds, time.perf_counter(), residuals, ready

    def _ended_early(self) -> Unavailable:
        return Unavailable(f"{self.where}: stream ended early")

    def _map_ring(self, ring) -> bool:
        """Take the worker's ring offer if this process can map it and connect to its step
        socket (the answer goes with the next step); False if it cannot."""
        kept = self._return_set_aside(offered=ring)
        try:
            self._ring = kept or transport.ring_class(ring.transport).attach(ring)
            socket = StepSocket.connect(ring.step_socket)
            with self._closing:
                if self._closed:  # close() would not see it to shut it down: nobody reads it
                    socket.close()
                    raise OSError("the request ended")
                self._socket = socket
            self._answer = ring.transport
            self._ring_keepable = ring.keepable
            return True
        except (OSError, ValueError, RuntimeError) as exc:
            if self._ring is not None:
                self._ring.close()
                self._ring = None
            log.warning(
                "%s: cannot map its %s ring (%s): inline bytes instead", self.where, transport.name(ring.transport), exc
            )
            self._answer = transport.INLINE
            return False

    def _return_set_aside(self, offered=None) -> ShmRing | None:
        """The set-aside ring the worker's offer names, if any (its mapping taken back); of the
        others, those the worker says it no longer holds are let go of, the rest are idle again."""
        with self._closing:
            set_aside, self._set_aside = self._set_aside, []
        kept, not_kept = None, set(offered.not_kept) if offered is not None else set()
        for ring in set_aside:
            if offered is not None and ring.name == offered.name and ring.is_offered_as(offered):
                kept = ring
            elif ring.name in not_kept or (offered is not None and ring.name == offered.name):
                ring.close()
            else:
                IDLE_RINGS.put(ring, self.address)
        return kept

    def _again_inline(self, step_index: int) -> controlnet_pb2.ResidualsRequest:
        """The offer's step asked again, its residuals inline this time (they are in the ring)."""
        step = controlnet_pb2.StepInput()
        step.CopyFrom(self._last_input)
        if step.step_index != step_index:
            raise Unavailable(f"{self.where}: ring offered with step {step_index}")
        step.transport = transport.INLINE
        return controlnet_pb2.ResidualsRequest(step=step)

    def _decode(self, msg) -> torch.Tensor:
        return codec.tensor_from_proto(msg, device=self._out_device, dtype=self._out_dtype)

    def start_step(self, step_index: int, timestep: torch.Tensor, sample: torch.Tensor) -> None:
        """`timestep`: on the host (reading a GPU one would wait for the GPU)."""
        step = controlnet_pb2.StepInput(step_index=step_index, timestep=float(timestep), transport=self._answer)
        if self._on_socket and self._ring.write_sample(sample, step_index):
            # In the ring's sample buffer: over CUDA IPC the copy is queued behind the work that
            # makes the sample, and nothing here waits for the GPU (through a host-memory ring it
            # must: the sample is copied out once made).
            step.sample_in_ring = True
            self._sent_at[step_index] = time.perf_counter()
        else:
            if sample.is_cuda:
                # Copying the latents out waits for the GPU to finish making them (the previous
                # step): wait here, so that `transport` counts the handoff, not this process's own
                # GPU queue (the copy below would wait just as long).
                torch.cuda.current_stream(sample.device).synchronize()
            self._sent_at[step_index] = time.perf_counter()
            step.sample.CopyFrom(codec.tensor_to_proto(sample))
        self._last_input = step  # asked again inline if its residuals come in a ring this process cannot map
        if self._on_socket:
            try:
                self._socket.send(step)
            except OSError:  # the worker is gone: the reader reports how the stream ended
                pass
            return
        self._requests.put(controlnet_pb2.ResidualsRequest(step=step))
        self._on_socket = self._socket is not None  # that was the answer: the socket from now on

    def wait_step(self) -> ControlNetResiduals:
        try:
            item = self._responses.get(timeout=self._step_timeout)
        except queue.Empty:
            self._failed = True
            raise DeadlineExceeded(f"{self.where}: no residuals within {self._step_timeout:.0f} s") from None
        if isinstance(item, BaseException):
            self._failed = True
            raise item
        step_index, compute_seconds, received_at, residuals, ready = item
        if self._out_device.type == "cuda":
            stream = torch.cuda.current_stream(self._out_device)  # the denoising loop's
            if ready is not None:
                stream.wait_event(ready)
            for tensor in (*residuals.down_block_res_samples, residuals.mid_block_res_sample):
                tensor.record_stream(stream)  # made on a ring's side stream: not reused before the loop is done
        # Transport: the round trip minus the ControlNet's own compute (serialization, gRPC, decode).
        transport_seconds = max(0.0, received_at - self._sent_at.pop(step_index) - compute_seconds)
        if not self.stats["steps"]:
            self.stats["first_step_transport"] = transport_seconds
        self.stats["compute"] += compute_seconds
        self.stats["transport"] += transport_seconds
        self.stats["steps"] += 1
        return residuals

    def close(self) -> None:
        if self._closed:  # once: a kept ring is another session's to use from then on
            return
        self._requests.put(_END)
        # Every step sent got its residuals, over a keepable ring the worker took the answer for:
        # ask the worker to keep the ring for the next session, and keep it here once it says so.
        keep = (
            isinstance(self._ring, ShmRing)
            and self._ring_keepable
            and self._on_socket
            and not self._failed
            and not self._sent_at
        )
        with self._closing:
            self._closed = True
            if keep:
                try:
                    self._socket.send(controlnet_pb2.StepInput(keep_ring=True))
                except OSError:  # the worker is gone: nothing to keep
                    keep = False
        if keep:  # the reader reads the answer, then the worker's end of the socket
            self._done_with_ring.wait(timeout=KEEP_WAIT_S)
        with self._closing:
            if self._socket is not None:
                self._socket.shutdown()  # the worker's session ends; the reader's read returns
        self._call.cancel()
        if self._ring is not None:
            # The reader may be copying out of the ring, which must not be closed under it.
            # Cancelled, it is done with the ring within CALL_CHECK_S, or once the copy is done
            # (milliseconds). Bounded: the request holds the worker until this returns.
            self._done_with_ring.wait(timeout=READER_STOP_S)
        done = self._done_with_ring.is_set()  # then the reader changes nothing here any more
        if self._socket is not None:
            self._socket.close()
        self._return_set_aside()  # the session ended before an offer named them: idle again
        if done and self._ring is not None and keep and self._ring_kept:
            IDLE_RINGS.put(self._ring, self.address)
        elif done and self._ring is not None:
            self._ring.close()
        elif self._ring is not None:  # left to the GC, never closed under a copy still running
            log.warning(
                "%s: the residual reader is still busy %.0f s after the request ended", self.where, READER_STOP_S
            )


class FailoverResidualSource:
    """A residual source that outlives its ControlNet worker: when the stream breaks (UNAVAILABLE),
    the step in progress is sent again to the next candidate (another worker hosting the
    ControlNet, or "" for this process) with the same session. Residuals are a function of the
    session and the step's input only, so the image does not change."""

    def __init__(self, controlnet_id: str, candidates: list[str], open_at: Callable[[str], object]):
        self.controlnet_id = controlnet_id
        self._candidates = list(candidates)
        self._open_at = open_at
        self._opened: list[object] = []
        self._last_step: tuple | None = None
        self.failovers: list[tuple[int, str, str]] = []  # (step, from, to)
        self.address, self._source = self._open_next()

    def _open_next(self) -> tuple[str, object]:
        address = self._candidates.pop(0)
        source = self._open_at(address)
        self._opened.append(source)
        return address, source

    @property
    def transport(self) -> int:
        """How the residuals of the stream in use arrive (0: this process)."""
        return getattr(self._source, "transport", 0)

    @property
    def stats(self) -> dict[str, float]:
        """Compute and transport over every stream this ControlNet used."""
        total: dict[str, float] = {}
        for source in self._opened:
            for key, value in getattr(source, "stats", {}).items():
                total[key] = total.get(key, 0.0) + value
        return total

    def start_step(self, step_index: int, timestep: torch.Tensor, sample: torch.Tensor) -> None:
        self._last_step = (step_index, timestep, sample)
        self._source.start_step(step_index, timestep, sample)

    def wait_step(self) -> ControlNetResiduals:
        while True:
            try:
                return self._source.wait_step()
            except Unavailable as exc:
                if not self._candidates:
                    raise
                broken = self.address
                self._source.close()
                self.address, self._source = self._open_next()
                step = self._last_step[0]
                self.failovers.append((step, broken, self.address))
                log.warning(
                    "controlnet %r: %s; step %d again on %s",
                    self.controlnet_id,
                    exc.message,
                    step,
                    self.address or "this worker",
                )
                self._source.start_step(*self._last_step)

    def close(self) -> None:
        self._source.close()
