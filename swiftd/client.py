"""Python client of the suite's public API (the gateway).

    from pathlib import Path
    from swiftd.client import Client, ControlNet, Lora

    with Client("127.0.0.1:50050") as client:
        result = client.generate(
            "a watercolor fox", width=512, height=512, num_inference_steps=30, seed=7,
            loras=[Lora("papercut-r64", 0.8)],
            controlnets=[ControlNet("sd15-canny", Path("edges.png").read_bytes(), conditioning_scale=0.9)],
        )
    result.save("fox.png")
    print(result.seed, result.trace_id, result.plan.unet_worker)

Keyword arguments are the fields of `swiftd.request.Request` (zero values mean "server
default"); a `Request` may be passed instead of the prompt. `generate_stream` yields the
GenerateStreamResponse events (queued, started, progress, preview, final); leaving the loop early
cancels the request, and the worker stops within one step. Errors are `grpc.RpcError`s with the
server's status code and a message naming the field or id.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import PIL.Image

from swiftd import rpc
from swiftd.request import ControlNet, Lora, Request
from swiftd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

__all__ = ["Client", "ControlNet", "Lora", "Request", "Result", "as_request", "format_timings"]


@dataclass
class Result:
    image_png: bytes
    seed: int
    timings: list[tuple[str, float]]
    trace_id: str
    request_id: str
    plan: gateway_pb2.Plan
    lora_applied_at_step: int = -1

    @classmethod
    def from_pb(cls, response: gateway_pb2.GenerateResponse) -> Result:
        return cls(
            image_png=response.image_png,
            seed=response.seed,
            timings=[(t.stage, t.seconds) for t in response.timings],
            trace_id=response.trace_id,
            request_id=response.request_id,
            plan=response.plan,
            lora_applied_at_step=response.lora_applied_at_step,
        )

    def image(self) -> PIL.Image.Image:
        return PIL.Image.open(io.BytesIO(self.image_png))

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.image_png)


def as_request(prompt: str | Request, **fields) -> Request:
    """`prompt` as a Request with `fields`, or the Request given (then no fields)."""
    if isinstance(prompt, Request):
        if fields:
            raise TypeError("pass either a Request or a prompt with fields, not both")
        return prompt
    return Request(prompt=prompt, **fields)


class Client:
    def __init__(self, address: str, timeout: float = 600.0, token: str = ""):
        """`token`: a bearer token the gateway knows (`--tokens-file`); TLS as `swiftd.security`
        is configured in this process (`security.configure_client`)."""
        self.address = address
        self.timeout = timeout
        self._channel = rpc.create_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._metadata = [("authorization", f"Bearer {token}")] if token else None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str | Request, timeout: float | None = None, **fields) -> Result:
        """One image; `fields` are Request fields. Ctrl-C cancels the request."""
        request = as_request(prompt, **fields).to_pb()
        future = self._stub.Generate.future(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            return Result.from_pb(_wait_interruptibly(future))
        except BaseException:
            future.cancel()
            raise

    def generate_stream(
        self, prompt: str | Request, timeout: float | None = None, **fields
    ) -> Iterator[gateway_pb2.GenerateStreamResponse]:
        """The request's events, the last one `final`; stop iterating to cancel it."""
        request = as_request(prompt, **fields).to_pb()
        call = self._stub.GenerateStream(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            yield from rpc.responses(call)
        finally:
            call.cancel()  # no-op once the stream has ended

    def list_models(self) -> list[common_pb2.ModelInfo]:
        return list(self._stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=30, metadata=self._metadata).models)

    def list_loras(self, family: str = "") -> list[common_pb2.LoraInfo]:
        return list(
            self._stub.ListLoras(gateway_pb2.ListLorasRequest(family=family), timeout=30, metadata=self._metadata).loras
        )

    def list_controlnets(self) -> list[common_pb2.ControlNetInfo]:
        return list(
            self._stub.ListControlNets(
                gateway_pb2.ListControlNetsRequest(), timeout=30, metadata=self._metadata
            ).controlnets
        )


def _wait_interruptibly(future):
    # A blocking gRPC call does not return to Python for signal handlers; polling does.
    while True:
        try:
            return future.result(timeout=0.2)
        except grpc.FutureTimeoutError:
            continue


def format_timings(timings: list[tuple[str, float]]) -> str:
    width = max([len(stage) for stage, _ in timings] + [5]) + 2
    rows = [f"{'stage':<{width}}  seconds"]
    rows += [f"  {stage:<{width}}{seconds:7.3f}" for stage, seconds in timings]
    return "\n".join(rows)
