"""The Diffusers baselines (bench/baselines) as processes on loopback, driven through swiftd.v1.Gateway.

Two baselines on the tiny SD1.5 model: `fuse` (two workers, one per core, behind the dispatcher,
a queue of one) and `adapters` (one worker, an adapter cache of one LoRA). Their images equal
plain Diffusers run here on the same inputs: fuse mode within 1 level per pixel (the same
operations; only the rounding left behind by earlier unfuses may differ), adapters mode within
2 levels (the LoRA is applied unfused, a different summation order); a negative control shows the
LoRA changes the image by far more than that. Dispatching spreads, queues and refuses as stated;
bad requests get their status naming the field or id; a passed deadline frees the worker.
"""

from __future__ import annotations

import io
import time

import grpc
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline

from bench.baselines import start_baseline
from swiftd import rpc, zoo
from swiftd.images import edge_image
from swiftd.loading import load_controlnet, load_pipeline
from swiftd.request import ControlNet, Lora, Request
from swiftd.v1 import gateway_pb2, gateway_pb2_grpc
from tests.reference import conditioning_image, reference_scheduler

MODEL = "tiny-sd15"
EDGES, DEPTH = "tiny-sd15-cn-edges", "tiny-sd15-cn-depth"
PEFT, KOHYA_TE = "tiny-sd15-lora-peft-r4", "tiny-sd15-lora-kohya-r16-te"
SIZE, STEPS = 64, 4
LONG_STEPS = 1000  # a request far longer than any check below waits
FUSE_TOLERANCE = 1  # max abs difference, 8-bit pixel levels
ADAPTER_TOLERANCE = 2
NEGATIVE_MARGIN = 10  # a LoRA left out must move some pixel by more than this


def request_a(**changes) -> Request:
    """One LoRA (PEFT keys, UNet only) and one ControlNet, with a guidance window and Euler."""
    fields = dict(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        seed=42,
        scheduler="euler",
        model_id=MODEL,
        loras=[Lora(PEFT, 0.8)],
        controlnets=[ControlNet(EDGES, edge_image(SIZE), conditioning_scale=0.9, guidance_end=0.8)],
    )
    return Request(**{**fields, **changes})


def request_b(**changes) -> Request:
    """A kohya LoRA touching the text encoder, a ControlNet in guess mode from 25 %, DPM++ 2M."""
    fields = dict(
        prompt="a red barn",
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        seed=7,
        scheduler="dpmpp_2m",
        loras=[Lora(KOHYA_TE, 1.3)],
        controlnets=[ControlNet(DEPTH, conditioning_image(3), guidance_start=0.25, guess_mode=True)],
    )
    return Request(**{**fields, **changes})


class Reference:
    """Plain Diffusers in this process, the usual way: load_lora_weights + set_adapters + fuse_lora."""

    def __init__(self, zoo_root):
        self.paths = zoo.zoo_paths(zoo_root, MODEL)
        self.pipe = load_pipeline(self.paths.model)
        self.controlnets = {cid: load_controlnet(self.paths.controlnets[cid]) for cid in (EDGES, DEPTH)}
        self.pristine = {c: _state(getattr(self.pipe, c)) for c in ("unet", "text_encoder")}
        self._images: dict[bytes, np.ndarray] = {}

    def image(self, request: Request) -> np.ndarray:
        key = request.to_pb().SerializeToString(deterministic=True)
        if key not in self._images:
            self._images[key] = self._run(request)
        return self._images[key]

    def _run(self, request: Request) -> np.ndarray:
        (cn,) = request.controlnets
        pipe = StableDiffusionControlNetPipeline(
            **self.pipe.components, controlnet=self.controlnets[cn.controlnet_id], requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = reference_scheduler(self.paths.model, request.scheduler)
        names = [f"ref{i}" for i in range(len(request.loras))]
        try:
            for name, lora in zip(names, request.loras):
                pipe.load_lora_weights(str(self.paths.loras[lora.lora_id]), adapter_name=name)
            if names:
                pipe.set_adapters(names, adapter_weights=[lora.scale for lora in request.loras])
                pipe.fuse_lora(adapter_names=names)
            image = pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt or None,
                height=request.height,
                width=request.width,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                generator=torch.Generator().manual_seed(request.seed),
                image=PIL.Image.open(io.BytesIO(cn.to_pb().image)).convert("RGB"),
                controlnet_conditioning_scale=cn.conditioning_scale,
                control_guidance_start=cn.guidance_start,
                control_guidance_end=cn.guidance_end,
                guess_mode=cn.guess_mode,
            ).images[0]
        finally:
            if names:
                pipe.unload_lora_weights()  # fused weights stay: put the originals back, by copy
                for component, state in self.pristine.items():
                    getattr(self.pipe, component).load_state_dict(state)
        return np.asarray(image, dtype=np.int16)


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def pixels(response: gateway_pb2.GenerateResponse) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(response.image_png)).convert("RGB"), dtype=np.int16)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape == (SIZE, SIZE, 3)
    return int(np.abs(a - b).max())


def stages(response: gateway_pb2.GenerateResponse) -> dict[str, float]:
    return {t.stage: t.seconds for t in response.timings}


@pytest.fixture(scope="module")
def reference(zoo_root):
    return Reference(zoo_root)


@pytest.fixture(scope="module")
def fuse(zoo_root):
    args = ["--max-steps", str(LONG_STEPS)]
    with start_baseline(
        zoo_root, MODEL, "fuse", cores=[0, 1], max_queue=1, worker_args=args, dispatcher_args=args
    ) as b:
        yield b


@pytest.fixture(scope="module")
def adapters(zoo_root):
    with start_baseline(zoo_root, MODEL, "adapters", cores=[1], adapter_cache=1) as b:
        yield b


def gateway(address: str) -> gateway_pb2_grpc.GatewayStub:
    return gateway_pb2_grpc.GatewayStub(rpc.create_channel(address))


def test_fuse_mode_equals_diffusers(fuse, reference):
    stub = gateway(fuse.address)
    for request in (request_a(), request_b()):
        response = stub.Generate(request.to_pb(), timeout=60)
        expected = reference.image(request)
        assert max_diff(pixels(response), expected) <= FUSE_TOLERANCE
        assert response.seed == request.seed
        assert response.plan.unet_worker in fuse.worker_addresses
        assert list(response.plan.lora_ids) == list(response.plan.pushed_lora_ids) == request.loras.ids
        assert list(stages(response)) == [
            "validate",
            "queue",
            "lora_load_fuse",
            "generate",
            "lora_unfuse_unload",
            "total",
        ]
    # Negative control: the same request without its LoRA is far from the LoRA's reference.
    without = stub.Generate(request_a(loras=[]).to_pb(), timeout=60)
    assert max_diff(pixels(without), reference.image(request_a())) > NEGATIVE_MARGIN
    assert "lora_load_fuse" not in stages(without)


def test_unset_seed_is_picked_and_reported(fuse, reference):
    response = gateway(fuse.address).Generate(request_a(seed=None).to_pb(), timeout=60)
    assert max_diff(pixels(response), reference.image(request_a(seed=response.seed))) <= FUSE_TOLERANCE


def test_adapters_mode_equals_diffusers_and_evicts(adapters, reference):
    stub = gateway(adapters.address)
    # Cache of one: B evicts A, and A must be loaded again (plan.pushed_lora_ids: loaded from file).
    for request, loaded in ((request_a(), [PEFT]), (request_b(), [KOHYA_TE]), (request_a(), [PEFT])):
        response = stub.Generate(request.to_pb(), timeout=60)
        assert max_diff(pixels(response), reference.image(request)) <= ADAPTER_TOLERANCE
        assert list(response.plan.pushed_lora_ids) == loaded
    again = stub.Generate(request_a().to_pb(), timeout=60)  # cached now: nothing loaded
    assert list(again.plan.pushed_lora_ids) == [] and "lora_load" not in stages(again)
    assert max_diff(pixels(again), reference.image(request_a())) <= ADAPTER_TOLERANCE
    # With an adapter still loaded, a request without LoRAs runs on the base weights (disable_lora),
    # and the next one with a LoRA has it again (enable_lora + set_adapters).
    plain = stub.Generate(request_a(loras=[]).to_pb(), timeout=60)
    assert max_diff(pixels(plain), reference.image(request_a(loras=[]))) <= ADAPTER_TOLERANCE
    assert max_diff(pixels(plain), reference.image(request_a())) > NEGATIVE_MARGIN
    after = stub.Generate(request_a().to_pb(), timeout=60)
    assert max_diff(pixels(after), reference.image(request_a())) <= ADAPTER_TOLERANCE


def _next_event(stream, kind: str):
    event = next(stream)
    assert event.WhichOneof("event") == kind, event
    return getattr(event, kind)


def test_dispatch_spreads_queues_and_refuses(fuse):
    stub = gateway(fuse.address)
    long = request_a(num_inference_steps=LONG_STEPS).to_pb()
    first, second = stub.GenerateStream(long, timeout=120), stub.GenerateStream(long, timeout=120)
    try:
        workers = {_next_event(first, "started").plan.unet_worker, _next_event(second, "started").plan.unet_worker}
        assert workers == set(fuse.worker_addresses)  # two at once: one on each worker
        third = stub.GenerateStream(request_a().to_pb(), timeout=120)
        assert _next_event(third, "queued").position == 0  # both workers busy: it waits, first in line
        with pytest.raises(grpc.RpcError) as refused:  # the queue (of one) is full
            stub.Generate(request_a().to_pb(), timeout=60)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        first.cancel()  # the workers stop within a step: the third request starts
        second.cancel()
    events = list(third)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "final" and set(kinds[1:-1]) == {"progress"}
    assert events[0].started.queued_seconds > 0
    assert events[0].started.plan.unet_worker in fuse.worker_addresses


@pytest.mark.parametrize("where", ["dispatcher", "worker"])
def test_refusals_name_the_field_and_the_worker_serves_on(fuse, where):
    stub = gateway(fuse.address if where == "dispatcher" else fuse.worker_addresses[0])
    cases = [
        (request_a(loras=[Lora("no-such-lora")]), grpc.StatusCode.NOT_FOUND, "loras[0].lora_id: 'no-such-lora'"),
        (
            request_a(controlnets=[ControlNet("no-such-cn", edge_image(SIZE))]),
            grpc.StatusCode.NOT_FOUND,
            "controlnets[0].controlnet_id: 'no-such-cn'",
        ),
        (request_a(model_id="no-such-model"), grpc.StatusCode.NOT_FOUND, "params.model_id: 'no-such-model'"),
        (request_a(width=65), grpc.StatusCode.INVALID_ARGUMENT, "params.width"),
        (request_a(loras=[Lora(PEFT, 100.0)]), grpc.StatusCode.INVALID_ARGUMENT, "loras[0].scale"),
        (
            request_a(controlnets=[ControlNet("tiny-sdxl-cn-edges", edge_image(SIZE))]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "controlnets[0].controlnet_id",
        ),
    ]
    for request, code, named in cases:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(request.to_pb(), timeout=60)
        assert refused.value.code() == code, refused.value.details()
        assert named in refused.value.details()
    assert stub.Generate(request_a().to_pb(), timeout=60).image_png


def test_deadline_stops_the_request_and_frees_its_worker(fuse):
    stream = gateway(fuse.address).GenerateStream(request_a(num_inference_steps=LONG_STEPS).to_pb(), timeout=2.0)
    worker = _next_event(stream, "started").plan.unet_worker
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as expired:
        for _ in stream:
            pass
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5.0
    # The worker took the next request at once: it stopped the expired one within a step, long
    # before its remaining ~900 steps.
    response = gateway(worker).Generate(request_a().to_pb(), timeout=30)
    assert stages(response)["queue"] < 1.0
