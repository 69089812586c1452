"""Python client for the suite.

Until the gateway lands, requests go straight to a UNet worker (`Denoise`); the request and
response shapes are the ones the gateway will expose.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import grpc
import numpy as np
import PIL.Image

from swiftd import rpc
from swiftd.v1 import common_pb2, unet_pb2, unet_pb2_grpc


@dataclass
class GenerationOutput:
    image_png: bytes
    seed: int
    timings: list[tuple[str, float]]
    lora_applied_at_step: int = -1


def edge_image(size: int) -> bytes:
    """A synthetic edge map (rings and a diagonal) as PNG: a stand-in for a Canny image."""
    y, x = np.mgrid[0:size, 0:size] / size
    r = np.hypot(x - 0.5, y - 0.5)
    edges = (np.abs(np.sin(r * 40)) < 0.15) | (np.abs(x - y) < 0.01)
    image = PIL.Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def format_timings(timings: list[tuple[str, float]]) -> str:
    width = max([len(stage) for stage, _ in timings] + [5]) + 2
    rows = [f"{'stage':<{width}}  seconds"]
    rows += [f"  {stage:<{width}}{seconds:7.3f}" for stage, seconds in timings]
    return "\n".join(rows)


def _wait_interruptibly(future):
    # A blocking gRPC call does not return to Python for signal handlers; polling does.
    while True:
        try:
            return future.result(timeout=0.2)
        except grpc.FutureTimeoutError:
            continue


def demo_request(unet_address: str, controlnet_address: str, args) -> GenerationOutput:
    request = unet_pb2.DenoiseRequest(
        params=common_pb2.GenerationParams(
            prompt="a photo of an astronaut riding a horse", negative_prompt="blurry",
            width=args.size, height=args.size, num_inference_steps=args.steps, guidance_scale=7.5, seed=42,
            scheduler=common_pb2.SCHEDULER_EULER, model_id=args.model_id,
        ),
        controlnets=[unet_pb2.ControlNetAttachment(input=common_pb2.ControlNetInput(
            controlnet_id=args.controlnet_id, image=edge_image(args.size), conditioning_scale=1.0,
        ), worker_address=controlnet_address)],
        loras=[common_pb2.LoraRef(lora_id=args.lora_id, scale=0.8)],
        request_id="make-run",
    )  # fmt: skip
    with rpc.create_channel(unet_address) as channel:
        future = unet_pb2_grpc.UNetWorkerStub(channel).Denoise.future(request, timeout=600)
        try:
            response = _wait_interruptibly(future)
        except BaseException:
            future.cancel()  # Ctrl-C: the worker stops its loop within one step
            raise
    return GenerationOutput(
        response.image_png, response.seed, [(t.stage, t.seconds) for t in response.timings], response.lora_applied_at_step
    )
