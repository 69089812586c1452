"""Python client of the suite's public API (the gateway).

    from swiftd.client import Client, ControlNet, Lora

    with Client("127.0.0.1:50050") as client:
        result = client.generate(
            "a watercolor fox", width=512, height=512, steps=30, seed=7,
            loras=[Lora("papercut-r64", 0.8)],
            controlnets=[ControlNet("sd15-canny", "edges.png", scale=0.9)],
        )
    result.save("fox.png")
    print(result.seed, result.trace_id, result.plan.unet_worker)

`generate_stream` yields the GenerateStreamResponse events (queued, started, progress, preview,
final); leaving the loop early cancels the request, and the worker stops within one step.
Errors are `grpc.RpcError`s with the server's status code and a message naming the field or id.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import PIL.Image

from swiftd import rpc
from swiftd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

SCHEDULERS = {
    "ddim": common_pb2.SCHEDULER_DDIM,
    "euler": common_pb2.SCHEDULER_EULER,
    "euler_a": common_pb2.SCHEDULER_EULER_ANCESTRAL,
    "dpmpp_2m": common_pb2.SCHEDULER_DPMPP_2M,
    "pndm": common_pb2.SCHEDULER_PNDM,
}
WIRE_DTYPES = {"float32": common_pb2.DTYPE_FLOAT32, "float16": common_pb2.DTYPE_FLOAT16, "bfloat16": common_pb2.DTYPE_BFLOAT16}


@dataclass
class Lora:
    lora_id: str
    scale: float = 1.0


@dataclass
class ControlNet:
    controlnet_id: str
    image: bytes | str | Path  # PNG/JPEG bytes, or a path to such a file
    scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    guess_mode: bool = False

    def to_proto(self) -> common_pb2.ControlNetInput:
        image = self.image if isinstance(self.image, bytes) else Path(self.image).read_bytes()
        return common_pb2.ControlNetInput(
            controlnet_id=self.controlnet_id, image=image, conditioning_scale=self.scale,
            guidance_start=self.guidance_start, guidance_end=self.guidance_end, guess_mode=self.guess_mode,
        )  # fmt: skip


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
    def from_proto(cls, response: gateway_pb2.GenerateResponse) -> "Result":
        return cls(
            response.image_png, response.seed, [(t.stage, t.seconds) for t in response.timings], response.trace_id,
            response.request_id, response.plan, response.lora_applied_at_step,
        )  # fmt: skip

    def image(self) -> PIL.Image.Image:
        return PIL.Image.open(io.BytesIO(self.image_png))

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.image_png)


@dataclass
class GenerateOptions:
    """Everything of a request but the prompt; zero values mean "server default"."""

    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance_scale: float = 0.0
    seed: int | None = None
    scheduler: str = ""  # a SCHEDULERS key; empty = the model's own
    model_id: str = ""
    loras: Sequence[Lora] = field(default_factory=list)
    controlnets: Sequence[ControlNet] = field(default_factory=list)
    lora_bound_steps: int | None = None
    request_id: str = ""
    preview_every_n_steps: int = 0
    controlnet_wire_dtype: str = ""  # a WIRE_DTYPES key; empty = the UNet's compute dtype


def build_request(prompt: str, options: GenerateOptions) -> gateway_pb2.GenerateRequest:
    o = options
    request = gateway_pb2.GenerateRequest(
        params=common_pb2.GenerationParams(
            prompt=prompt, negative_prompt=o.negative_prompt, width=o.width, height=o.height,
            num_inference_steps=o.steps, guidance_scale=o.guidance_scale, model_id=o.model_id,
            scheduler=SCHEDULERS[o.scheduler] if o.scheduler else common_pb2.SCHEDULER_UNSPECIFIED,
        ),
        loras=[common_pb2.LoraRef(lora_id=lora.lora_id, scale=lora.scale) for lora in o.loras],
        controlnets=[cn.to_proto() for cn in o.controlnets],
        request_id=o.request_id, preview_every_n_steps=o.preview_every_n_steps,
        controlnet_wire_dtype=WIRE_DTYPES[o.controlnet_wire_dtype] if o.controlnet_wire_dtype else common_pb2.DTYPE_UNSPECIFIED,
    )  # fmt: skip
    if o.seed is not None:
        request.params.seed = o.seed
    if o.lora_bound_steps is not None:
        request.lora_bound_steps = o.lora_bound_steps
    return request


class Client:
    def __init__(self, address: str, timeout: float = 600.0):
        self.address = address
        self.timeout = timeout
        self._channel = rpc.create_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str, timeout: float | None = None, **options) -> Result:
        """One image; `options` are GenerateOptions fields. Ctrl-C cancels the request."""
        future = self._stub.Generate.future(build_request(prompt, GenerateOptions(**options)), timeout=timeout or self.timeout)
        try:
            return Result.from_proto(_wait_interruptibly(future))
        except BaseException:
            future.cancel()
            raise

    def generate_stream(self, prompt: str, timeout: float | None = None, **options) -> Iterator[gateway_pb2.GenerateStreamResponse]:
        """The request's events, the last one `final`; stop iterating to cancel it."""
        call = self._stub.GenerateStream(build_request(prompt, GenerateOptions(**options)), timeout=timeout or self.timeout)
        try:
            yield from call
        finally:
            call.cancel()  # no-op once the stream has ended

    def list_models(self) -> list[common_pb2.ModelInfo]:
        return list(self._stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=30).models)

    def list_loras(self, family: str = "") -> list[common_pb2.LoraInfo]:
        return list(self._stub.ListLoras(gateway_pb2.ListLorasRequest(family=family), timeout=30).loras)

    def list_controlnets(self) -> list[common_pb2.ControlNetInfo]:
        return list(self._stub.ListControlNets(gateway_pb2.ListControlNetsRequest(), timeout=30).controlnets)


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
