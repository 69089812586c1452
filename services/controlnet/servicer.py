"""ControlNetWorker servicer: one bidi stream per (request, ControlNet)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
from opentelemetry import trace

from services.controlnet.registry import ControlNetRegistry, SessionRunner
from services.controlnet.session_channel import SessionChannel
from swiftd import device, metrics, transport
from swiftd.controlnet_step import ControlNetSession
from swiftd.errors import InvalidArgument
from swiftd.request import check_id
from swiftd.transport.idle import IdleRings
from swiftd.v1 import common_pb2, controlnet_pb2, controlnet_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer("swiftd.controlnet")


class ControlNetWorkerServicer(controlnet_pb2_grpc.ControlNetWorkerServicer):
    def __init__(
        self,
        registry: ControlNetRegistry,
        after_first_session: Callable[[], None] | None = None,
        transports: tuple[int, ...] = transport.parse(transport.DEFAULT),
    ):
        """`transports`: the residual transports besides inline this worker accepts, fastest first."""
        self.registry = registry
        self.transports = transports
        self._after_first_session = after_first_session  # e.g. log that serving compiled nothing
        self._first_session_lock = threading.Lock()
        # After configure_process pinned the cores: the device as the gateway compares devices.
        self.device, self.host = device.local_device(registry.device), device.local_host()
        torch_device = torch.device(registry.device)
        self.device_type = torch_device.type
        self.host_identity = transport.host_identity()
        self.idle_rings = IdleRings()  # shared-memory rings kept between sessions (swiftd/transport/idle.py)
        # CUDA IPC is chosen only for a UNet worker that can map this GPU.
        self.gpu_uuid = device.gpu_uuid(torch_device.index or 0) if self.device_type == "cuda" else None

    def StreamResiduals(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "start":
            raise InvalidArgument("start", "the first message of a residual stream must be a SessionStart")
        start = first.start
        wire_dtype = start.wire_dtype or common_pb2.DTYPE_UNSPECIFIED
        peer = transport.Peer.from_pb(start)
        chosen = transport.choose(start.transports, peer, self.transports, self.device_type, self.gpu_uuid)
        if transport.CUDA_IPC in start.transports and self.gpu_uuid and not peer.can_map_cuda(self.gpu_uuid):
            log.info(
                "session %s/%s: the UNet worker cannot map GPU %s (it sees %s; PID namespace %s, here %s): %s",
                start.request_id,
                start.controlnet_id,
                self.gpu_uuid,
                list(peer.gpus),
                peer.pid_namespace,
                transport.pid_namespace(),
                transport.name(chosen),
            )
        t_session = time.perf_counter()
        with tracer.start_as_current_span(
            "controlnet.session_start",
            attributes={"controlnet.id": start.controlnet_id, "controlnet.transport": transport.name(chosen)},
        ):
            runner = SessionRunner(self.registry, ControlNetSession.from_pb(start))  # embeds the hint once
        # Embedding the conditioning image is ControlNet work the first step waits for: counted in
        # its compute_seconds, so that the UNet worker's transport figure is only transport.
        setup_seconds = time.perf_counter() - t_session
        label = f"session {start.request_id}/{start.controlnet_id}"
        channel = SessionChannel(chosen, wire_dtype, label, context, self.idle_rings, start.idle_rings)
        log.debug("%s opened (transport %s)", label, transport.name(chosen))
        try:
            for step in channel.step_inputs(request_iterator):
                sample = channel.sample(step)
                t0 = time.perf_counter()
                with tracer.start_as_current_span("controlnet.step", attributes={"step": step.step_index}) as span:
                    residuals = runner.step(step.timestep, sample, out=channel.slot(sample, runner.device))
                    seconds = time.perf_counter() - t0 + setup_seconds
                    setup_seconds = 0.0
                    tensors = [*residuals.down_block_res_samples, residuals.mid_block_res_sample]
                    response = channel.respond(step, tensors, seconds)
                    via = "ring" if step.sample_in_ring else "bytes"
                    metrics.CONTROLNET_STEPS.labels(via, channel.residuals_via).inc()
                    span.set_attribute("controlnet.transport", transport.name(channel.used))
                if response is not None:  # None: it went over the session's step socket
                    yield response
        finally:
            channel.close()
            runner.close()
            log.debug("%s closed", label)
            self._report_first_session()

    def _report_first_session(self) -> None:
        with self._first_session_lock:
            report, self._after_first_session = self._after_first_session, None
        if report is not None:
            try:
                report()
            except Exception:  # a report must never fail the session it follows
                log.exception("first-session report failed")

    def _info(self, controlnet_id: str, loaded: dict[str, int], compiled: set[str]) -> common_pb2.ControlNetInfo:
        return common_pb2.ControlNetInfo(
            controlnet_id=controlnet_id,
            family=self.registry.family(controlnet_id),
            size_bytes=loaded.get(controlnet_id, 0),
            loaded=controlnet_id in loaded,
            compiled=controlnet_id in compiled,
            transports=transport.usable(self.transports, self.device_type),
        )

    def ListControlNets(self, request, context):
        loaded, compiled = self.registry.loaded(), self.registry.compiled()
        ids = sorted(set(self.registry.available()) | set(loaded))
        return controlnet_pb2.ControlNetWorkerListControlNetsResponse(
            controlnets=[self._info(i, loaded, compiled) for i in ids],
            device=self.device,
            host=self.host,
            host_identity=self.host_identity,
        )

    def LoadControlNet(self, request, context):
        check_id("controlnet_id", request.controlnet_id)
        already, seconds = self.registry.load(request.controlnet_id)
        return controlnet_pb2.LoadControlNetResponse(
            controlnet=self._info(request.controlnet_id, self.registry.loaded(), self.registry.compiled()),
            already_loaded=already,
            load_seconds=seconds,
        )

    def UnloadControlNet(self, request, context):
        check_id("controlnet_id", request.controlnet_id)
        return controlnet_pb2.UnloadControlNetResponse(was_loaded=self.registry.unload(request.controlnet_id))
