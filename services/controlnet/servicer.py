"""ControlNetWorker servicer: one bidi stream per (request, ControlNet)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from opentelemetry import trace

from services.controlnet.engine import ControlNetRegistry, ResidualSession
from swiftd import codec
from swiftd.controlnet_step import ControlNetSession
from swiftd.errors import InvalidArgument
from swiftd.loading import check_id
from swiftd.v1 import common_pb2, controlnet_pb2, controlnet_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer("swiftd.controlnet")


def _tensor(msg, field: str, required: bool = True):
    if not msg.ByteSize():
        if required:
            raise InvalidArgument(field, "is required")
        return None
    try:
        return codec.tensor_from_proto(msg)
    except ValueError as exc:
        raise InvalidArgument(field, str(exc)) from None


def constants_from_proto(start: controlnet_pb2.SessionStart) -> ControlNetSession:
    check_id("start.controlnet_id", start.controlnet_id)
    constants = ControlNetSession(
        controlnet_id=start.controlnet_id,
        controlnet_cond=_tensor(start.controlnet_cond, "start.controlnet_cond"),
        encoder_hidden_states=_tensor(start.encoder_hidden_states, "start.encoder_hidden_states"),
        text_embeds=_tensor(start.text_embeds, "start.text_embeds", required=False),
        time_ids=_tensor(start.time_ids, "start.time_ids", required=False),
        conditioning_scale=start.conditioning_scale or 1.0,
        guess_mode=start.guess_mode,
    )
    if constants.controlnet_cond.dim() != 4 or constants.controlnet_cond.shape[1] != 3:
        raise InvalidArgument("start.controlnet_cond", f"expected NCHW with 3 channels, got {tuple(constants.controlnet_cond.shape)}")
    return constants


class ControlNetWorkerServicer(controlnet_pb2_grpc.ControlNetWorkerServicer):
    def __init__(self, registry: ControlNetRegistry, after_first_session: Callable[[], None] | None = None):
        self.registry = registry
        self._after_first_session = after_first_session  # e.g. log that serving compiled nothing
        self._first_session_lock = threading.Lock()

    def StreamResiduals(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "start":
            raise InvalidArgument("start", "the first message of a residual stream must be a SessionStart")
        start = first.start
        wire_dtype = start.wire_dtype or common_pb2.DTYPE_UNSPECIFIED
        with tracer.start_as_current_span("controlnet.session_start", attributes={"controlnet.id": start.controlnet_id}):
            session = ResidualSession(self.registry, constants_from_proto(start))  # embeds the hint once
        log.debug("session %s/%s opened", start.request_id, start.controlnet_id)
        try:
            for message in request_iterator:
                if message.WhichOneof("kind") != "step":
                    raise InvalidArgument("step", "only StepInput messages may follow the SessionStart")
                step = message.step
                sample = _tensor(step.sample, "step.sample")
                t0 = time.perf_counter()
                with tracer.start_as_current_span("controlnet.step", attributes={"step": step.step_index}):
                    residuals = session.step(step.timestep, sample)
                seconds = time.perf_counter() - t0
                yield controlnet_pb2.ResidualsResponse(
                    step_index=step.step_index,
                    down_block_res_samples=[codec.tensor_to_proto(r, wire_dtype) for r in residuals.down_block_res_samples],
                    mid_block_res_sample=codec.tensor_to_proto(residuals.mid_block_res_sample, wire_dtype),
                    compute_seconds=seconds,
                )
        finally:
            session.close()
            log.debug("session %s/%s closed", start.request_id, start.controlnet_id)
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
            controlnet_id=controlnet_id, family=self.registry.family(controlnet_id),
            size_bytes=loaded.get(controlnet_id, 0), loaded=controlnet_id in loaded, compiled=controlnet_id in compiled,
        )  # fmt: skip

    def ListControlNets(self, request, context):
        loaded, compiled = self.registry.loaded(), self.registry.compiled()
        ids = sorted(set(self.registry.available()) | set(loaded))
        return controlnet_pb2.ControlNetWorkerListControlNetsResponse(controlnets=[self._info(i, loaded, compiled) for i in ids])

    def LoadControlNet(self, request, context):
        check_id("controlnet_id", request.controlnet_id)
        already, seconds = self.registry.load(request.controlnet_id)
        return controlnet_pb2.LoadControlNetResponse(
            controlnet=self._info(request.controlnet_id, self.registry.loaded(), self.registry.compiled()),
            already_loaded=already, load_seconds=seconds,
        )  # fmt: skip

    def UnloadControlNet(self, request, context):
        check_id("controlnet_id", request.controlnet_id)
        return controlnet_pb2.UnloadControlNetResponse(was_loaded=self.registry.unload(request.controlnet_id))
