"""The UNet worker as a real process on a loopback port: results, errors, streaming, cancel."""

from __future__ import annotations

import io
import re
import time

import grpc
import PIL.Image
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.unet.pipeline import UNetPipeline
from swiftd import codec, rpc, zoo
from swiftd.controlnet_step import ControlNetStepper
from swiftd.images import edge_image
from swiftd.launcher import start_unet
from swiftd.loading import load_controlnet, load_pipeline
from swiftd.lora import extract_deltas
from swiftd.request import ControlNet, Request
from swiftd.v1 import common_pb2, unet_pb2, unet_pb2_grpc

MODEL = "tiny-sd15"
CN = "tiny-sd15-cn-edges"
LORA = "tiny-sd15-lora-kohya-r16-te"


@pytest.fixture(scope="module")
def worker(zoo_root):
    service = start_unet(zoo_root, MODEL, num_threads=1, extra_args=["--max-steps", "1000"])
    channel = rpc.create_channel(service.address)
    yield unet_pb2_grpc.UNetWorkerStub(channel), channel, service
    channel.close()
    service.stop()
    assert service.process.returncode == 0, service.log_tail()


def request(steps=4, size=64, **overrides) -> unet_pb2.DenoiseRequest:
    params = dict(
        prompt="a photo of a horse",
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=7.5,
        seed=123,
        scheduler=common_pb2.SCHEDULER_EULER,
        model_id=MODEL,
    )
    params.update(overrides.pop("params", {}))
    return unet_pb2.DenoiseRequest(params=common_pb2.GenerationParams(**params), **overrides)


def with_addons(**kwargs) -> unet_pb2.DenoiseRequest:
    return request(
        controlnets=[
            unet_pb2.ControlNetAttachment(
                input=common_pb2.ControlNetInput(
                    controlnet_id=CN, image=edge_image(64), conditioning_scale=0.9, guidance_end=0.8
                )
            )
        ],
        loras=[common_pb2.LoraRef(lora_id=LORA, scale=0.7)],
        return_latents=True,
        request_id="r-1",
        **kwargs,
    )


def test_controlnet_and_lora_over_grpc_equal_in_process_engine(worker, zoo_root):
    stub, _, _ = worker
    response = stub.Denoise(with_addons(), timeout=120)
    assert response.request_id == "r-1" and response.seed == 123
    assert response.lora_applied_at_step == 0
    image = PIL.Image.open(io.BytesIO(response.image_png))
    assert image.size == (64, 64)
    stages = [t.stage for t in response.timings]
    assert {"text_encode", "denoise", "vae_decode", "lora_text_encoder", "lora_unet_patch"} <= set(stages)

    # The same request through the engine in this process (proved equal to Diffusers elsewhere).
    paths = zoo.zoo_paths(zoo_root, MODEL)
    pipe = load_pipeline(paths.model)
    engine = UNetPipeline(
        pipe,
        load_controlnet=lambda cid: ControlNetStepper(load_controlnet(paths.controlnets[cid])),
        load_lora=lambda lid: extract_deltas(pipe, paths.loras[lid]),
    )
    cond = PIL.Image.open(io.BytesIO(edge_image(64))).convert("RGB")
    expected = engine.generate(
        Request(
            "a photo of a horse",
            width=64,
            height=64,
            num_inference_steps=4,
            seed=123,
            scheduler="euler",
            controlnets=[ControlNet(CN, cond, 0.9, 0.0, 0.8)],
            loras=[(LORA, 0.7)],
        )
    )
    latents = codec.tensor_from_proto(response.latents)
    assert torch.allclose(latents, expected.latents, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "bad, code, field",
    [
        (request(params={"width": 65}), grpc.StatusCode.INVALID_ARGUMENT, "params.width"),
        (request(params={"model_id": "nope"}), grpc.StatusCode.NOT_FOUND, "params.model_id"),
        (request(params={"scheduler": 99}), grpc.StatusCode.INVALID_ARGUMENT, "params.scheduler"),
        (request(loras=[common_pb2.LoraRef(lora_id="missing-lora")]), grpc.StatusCode.NOT_FOUND, "lora_id"),
        (
            request(loras=[common_pb2.LoraRef(lora_id="../../etc/passwd")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "loras[0].lora_id",
        ),
        (
            request(loras=[common_pb2.LoraRef(lora_id="tiny-sdxl-lora-peft-r4")]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "tiny-sdxl-lora-peft-r4",
        ),
        (
            request(
                controlnets=[
                    unet_pb2.ControlNetAttachment(
                        input=common_pb2.ControlNetInput(controlnet_id="missing-cn", image=edge_image(64))
                    )
                ]
            ),
            grpc.StatusCode.NOT_FOUND,
            "controlnet_id",
        ),
        (
            request(
                controlnets=[
                    unet_pb2.ControlNetAttachment(
                        input=common_pb2.ControlNetInput(controlnet_id=CN, image=b"not an image")
                    )
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "controlnets[0].input.image",
        ),
        (
            request(
                controlnets=[
                    unet_pb2.ControlNetAttachment(
                        input=common_pb2.ControlNetInput(
                            controlnet_id=CN, image=edge_image(64), guidance_start=0.9, guidance_end=0.5
                        )
                    )
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "controlnets[0].input.guidance_start",
        ),
        (
            request(steps=1000, params={"scheduler": common_pb2.SCHEDULER_DDIM}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "params.num_inference_steps",
        ),
    ],
    ids=[
        "width",
        "model",
        "scheduler",
        "lora-missing",
        "lora-path",
        "lora-family",
        "cn-missing",
        "cn-image",
        "cn-window",
        "steps-past-schedule",
    ],
)
def test_bad_requests_get_clear_status_and_change_nothing(worker, bad, code, field):
    stub, channel, service = worker
    # Put a LoRA set in place first: a bad request must not change it.
    stub.Denoise(request(steps=1, loras=[common_pb2.LoraRef(lora_id=LORA, scale=0.7)]), timeout=60)
    before = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        stub.Denoise(bad, timeout=60)
    assert info.value.code() == code, info.value.details()
    assert field in info.value.details()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    after = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=10)
    assert [(x.lora_id, x.scale) for x in before.applied_loras] == [(LORA, pytest.approx(0.7))]
    assert list(after.applied_loras) == list(before.applied_loras)
    assert service.process.poll() is None


def test_stream_reports_progress_previews_and_result(worker):
    stub, _, _ = worker
    events = list(stub.DenoiseStream(request(steps=4, preview_every_n_steps=2), timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "final" and kinds.count("final") == 1
    progress = [e.progress.step for e in events if e.HasField("progress")]
    assert progress == [1, 2, 3, 4]
    previews = [e.preview for e in events if e.HasField("preview")]
    assert [p.step for p in previews] == [2]
    assert PIL.Image.open(io.BytesIO(previews[0].image_png)).size[0] > 0
    assert events[-1].final.image_png


def test_a_call_says_it_accepted_the_request_before_its_first_step(worker):
    """The gateway re-plans a request only while its worker has not taken it: the worker says so in
    its initial metadata as soon as the request passed its checks, before any step (streamed or
    unary); a request it refuses never carries that mark."""
    stub, _, _ = worker
    for call in (
        stub.DenoiseStream(request(steps=200, size=128, request_id="accepted"), timeout=120),
        stub.Denoise.future(request(steps=200, size=128, request_id="accepted-unary"), timeout=120),
    ):
        try:
            assert rpc.ACCEPTED in call.initial_metadata()  # returns once sent: the loop is still at work
        finally:
            call.cancel()
    refused = stub.DenoiseStream(request(params=dict(model_id="no-such-model")), timeout=60)
    with pytest.raises(grpc.RpcError) as error:
        list(refused)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc.ACCEPTED not in (error.value.initial_metadata() or ())
    with pytest.raises(grpc.RpcError) as error:
        stub.Denoise(request(params=dict(model_id="no-such-model")), timeout=60)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc.ACCEPTED not in (error.value.initial_metadata() or ())


# The loop checks for a cancelled caller at every step boundary, so it stops before the step
# after the one running when the cancellation arrives. Progress events travel while the loop goes
# on: allow up to IN_FLIGHT_STEPS more steps done than the client had seen when it cancelled.
IN_FLIGHT_STEPS = 2


def test_cancelled_stream_stops_the_loop_within_a_step_and_frees_the_worker(worker):
    stub, _, service = worker
    logged_before = len(service.log_lines)
    # 128 px: a step long enough that the cancellation's trip is a small part of one.
    call = stub.DenoiseStream(request(steps=200, size=128, request_id="cancel-me"), timeout=120)
    seen = 0
    for event in call:
        if event.HasField("progress"):
            seen = event.progress.step  # steps done
            if seen == 3:
                break
    call.cancel()
    stopped = stopped_before_step(service, "cancel-me", logged_before)
    assert seen <= stopped <= seen + 1 + IN_FLIGHT_STEPS, (seen, stopped)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=10)
        if status.requests_in_flight == 0 and status.queue_length == 0:
            break
        time.sleep(0.1)
    assert status.requests_in_flight == 0 and status.queue_length == 0
    # Ready for the next request.
    assert stub.Denoise(request(steps=2), timeout=60).image_png


def stopped_before_step(service, request_id: str, start: int, timeout: float = 10) -> int:
    """The step before which the worker stopped `request_id`'s loop, from its log (the line
    "request <id>: request cancelled before step N")."""
    pattern = re.compile(rf"request {re.escape(request_id)}: request cancelled before step (\d+)")
    deadline = time.monotonic() + timeout
    while True:
        for line in service.log_lines[start:]:
            if match := pattern.search(line):
                return int(match.group(1))
        assert time.monotonic() < deadline, service.log_tail()
        time.sleep(0.05)
