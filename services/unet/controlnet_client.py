"""The UNet worker's side of ControlNet-as-a-service: one bidi stream per ControlNet of a request.

`RemoteResidualSource.start_step` only queues the step's input for gRPC's sender, so the UNet's
encoder half runs while the ControlNet worker computes; a reader thread receives and decodes the
residuals meanwhile, and `wait_step` hands them over. A dead worker surfaces as UNAVAILABLE, a
slow one as DEADLINE_EXCEEDED (the stream carries the request's deadline, and no step waits
longer than `step_timeout`).
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import torch

from swiftd import codec
from swiftd.controlnet_step import ControlNetResiduals, ControlNetSession
from swiftd.errors import DeadlineExceeded, InvalidArgument, NotFound, ServingError, Unavailable
from swiftd.v1 import controlnet_pb2, controlnet_pb2_grpc

_END = object()


def _error_from_rpc(address: str, controlnet_id: str, exc: grpc.RpcError) -> ServingError:
    code, details = exc.code(), exc.details()
    where = f"controlnet {controlnet_id!r} on {address}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{where}: deadline exceeded")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound("controlnet_id", controlnet_id)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"controlnets[{controlnet_id}]", details or "rejected by the ControlNet worker")
    return Unavailable(f"{where}: {code.name.lower()}: {details}")


class RemoteResidualSource:
    def __init__(
        self,
        channel: grpc.Channel,
        address: str,
        session: ControlNetSession,
        wire_dtype: int,
        request_id: str,
        timeout: float | None,
        step_timeout: float,
        out_dtype: torch.dtype,
        out_device: torch.device,
    ):
        self.address = address
        self.controlnet_id = session.controlnet_id
        self._step_timeout = step_timeout
        self._out_dtype, self._out_device = out_dtype, out_device
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._sent_at: dict[int, float] = {}
        self.stats = {"compute": 0.0, "transport": 0.0, "steps": 0}

        def tensor(t):
            return codec.tensor_to_proto(t) if t is not None else None

        start = controlnet_pb2.SessionStart(
            controlnet_id=session.controlnet_id,
            controlnet_cond=tensor(session.controlnet_cond),
            encoder_hidden_states=tensor(session.encoder_hidden_states),
            text_embeds=tensor(session.text_embeds),
            time_ids=tensor(session.time_ids),
            conditioning_scale=session.conditioning_scale,
            guess_mode=session.guess_mode,
            wire_dtype=wire_dtype,
            request_id=request_id,
        )
        self._requests.put(controlnet_pb2.ResidualsRequest(start=start))
        stub = controlnet_pb2_grpc.ControlNetWorkerStub(channel)
        self._call = stub.StreamResiduals(iter(self._requests.get, _END), timeout=timeout)
        self._reader = threading.Thread(target=self._read, name=f"residuals-{self.controlnet_id}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                residuals = ControlNetResiduals(
                    tuple(self._decode(t) for t in response.down_block_res_samples),
                    self._decode(response.mid_block_res_sample),
                )
                self._responses.put((response.step_index, response.compute_seconds, time.perf_counter(), residuals))
            self._responses.put(Unavailable(f"controlnet {self.controlnet_id!r} on {self.address}: stream ended early"))
        except grpc.RpcError as exc:
            self._responses.put(_error_from_rpc(self.address, self.controlnet_id, exc))
        except Exception as exc:  # noqa: BLE001 - surfaced on the request's thread
            self._responses.put(exc)

    def _decode(self, msg) -> torch.Tensor:
        return codec.tensor_from_proto(msg, device=self._out_device, dtype=self._out_dtype)

    def start_step(self, step_index: int, timestep: torch.Tensor, sample: torch.Tensor) -> None:
        self._sent_at[step_index] = time.perf_counter()
        step = controlnet_pb2.StepInput(step_index=step_index, timestep=float(timestep), sample=codec.tensor_to_proto(sample))
        self._requests.put(controlnet_pb2.ResidualsRequest(step=step))

    def wait_step(self) -> ControlNetResiduals:
        try:
            item = self._responses.get(timeout=self._step_timeout)
        except queue.Empty:
            raise DeadlineExceeded(
                f"controlnet {self.controlnet_id!r} on {self.address}: no residuals within {self._step_timeout:.0f} s"
            ) from None
        if isinstance(item, BaseException):
            raise item
        step_index, compute_seconds, received_at, residuals = item
        # Transport: the round trip minus the ControlNet's own compute (serialization, gRPC, decode).
        self.stats["compute"] += compute_seconds
        self.stats["transport"] += max(0.0, received_at - self._sent_at.pop(step_index) - compute_seconds)
        self.stats["steps"] += 1
        return residuals

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()
