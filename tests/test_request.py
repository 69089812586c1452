"""The request vocabulary (swiftd/request.py): every enum value has its row, the zero-value rules,
conversions both ways, the field rules, and that the gateway's side needs no torch."""

from __future__ import annotations

import subprocess
import sys

import diffusers
import pytest
import torch

from swiftd import codec
from swiftd.errors import InvalidArgument
from swiftd.images import edge_image
from swiftd.request import (
    SCHEDULERS,
    WIRE_DTYPES,
    ControlNet,
    Limits,
    Lora,
    LoraSet,
    Request,
    validate,
)
from swiftd.v1 import common_pb2, gateway_pb2, unet_pb2


def test_every_scheduler_enum_value_has_one_row_naming_a_diffusers_scheduler():
    values = [v for v in common_pb2.Scheduler.values() if v != common_pb2.SCHEDULER_UNSPECIFIED]
    assert sorted(row.proto for row in SCHEDULERS) == sorted(values)
    assert len({row.name for row in SCHEDULERS}) == len(SCHEDULERS)
    for row in SCHEDULERS:
        assert issubclass(getattr(diffusers, row.diffusers_class), diffusers.SchedulerMixin), row


def test_every_dtype_enum_value_has_a_tensor_row_and_the_float_ones_a_wire_row():
    floats = []
    for value in common_pb2.DType.values():
        if value == common_pb2.DTYPE_UNSPECIFIED:
            continue
        dtype = codec.dtype_from_proto(value)  # raises for a value without a row
        if dtype.is_floating_point:
            floats.append(value)
    assert sorted(WIRE_DTYPES.values()) == sorted(floats)
    assert all(codec.dtype_from_proto(v) == getattr(torch, name) for name, v in WIRE_DTYPES.items())


def test_zero_means_one_for_scales_and_the_guidance_end():
    assert Lora("a", 0.0).scale == 1.0 and Lora("a", -0.5).scale == -0.5
    cn = ControlNet("c", b"", conditioning_scale=0.0, guidance_end=0.0)
    assert (cn.conditioning_scale, cn.guidance_end) == (1.0, 1.0)
    pb = common_pb2.ControlNetInput(controlnet_id="c", image=b"x")
    assert ControlNet.from_pb(pb).conditioning_scale == 1.0


def test_lora_set_key_compares_scales_at_float32_precision():
    sent = LoraSet.of([("a", 0.7), ("b", 0.0)])
    received = LoraSet.from_pb(sent.to_pb())  # 0.7 as float32 is 0.699999988...
    assert received.loras[0].scale != 0.7
    assert received.key == sent.key == (("a", 0.7), ("b", 1.0))
    assert LoraSet.of([("a", 0.7)]).key != LoraSet.of([("a", 0.71)]).key
    assert received.only(["b"]).ids == ["b"]


def test_generate_and_denoise_requests_round_trip():
    request = Request(
        prompt="a cat",
        negative_prompt="blurry",
        width=64,
        height=128,
        num_inference_steps=7,
        guidance_scale=5.0,
        seed=0,
        scheduler="euler_a",
        model_id="tiny-sd15",
        loras=[("a", 0.5)],
        controlnets=[ControlNet("c", b"png", 0.5, 0.1, 0.9, guess_mode=True, worker_address="h:1")],
        lora_bound_steps=3,
        request_id="r-1",
        preview_every_n_steps=2,
        controlnet_wire_dtype="float16",
        lora_store_address="s:2",
        pushed_lora_ids=("a",),
        return_latents=True,
    )
    denoise = request.to_denoise_pb()
    assert denoise.params.HasField("seed") and denoise.params.seed == 0
    assert denoise.params.scheduler == common_pb2.SCHEDULER_EULER_ANCESTRAL
    assert denoise.controlnet_wire_dtype == common_pb2.DTYPE_FLOAT16
    assert Request.from_pb(unet_pb2.DenoiseRequest.FromString(denoise.SerializeToString())) == request

    public = Request.from_pb(request.to_pb())
    assert public.controlnets[0].worker_address == "" and public.lora_store_address == ""
    assert public.pushed_lora_ids == () and not public.return_latents
    assert public.loras == request.loras and public.seed == 0 and public.lora_bound_steps == 3


def test_unset_fields_stay_unset_and_resolve_to_the_defaults():
    request = Request.from_pb(gateway_pb2.GenerateRequest(lora_bound_steps=-1))
    assert request.seed is None and request.lora_bound_steps is None and request.scheduler == ""
    assert not request.to_pb().params.HasField("seed") and not request.to_pb().HasField("lora_bound_steps")
    resolved = request.resolved(native_size=512, default_lora_bound_steps=2)
    assert (resolved.width, resolved.height, resolved.num_inference_steps, resolved.guidance_scale) == (
        512,
        512,
        20,
        7.5,
    )
    assert resolved.lora_bound_steps == 2 and isinstance(resolved.seed, int)
    assert resolved.resolved(native_size=64) == resolved  # idempotent: the seed is drawn once


@pytest.mark.parametrize(
    "pb, field",
    [
        (gateway_pb2.GenerateRequest(params=common_pb2.GenerationParams(scheduler=99)), "params.scheduler"),
        (gateway_pb2.GenerateRequest(controlnet_wire_dtype=common_pb2.DTYPE_INT64), "controlnet_wire_dtype"),
    ],
)
def test_unknown_enum_values_name_their_field(pb, field):
    with pytest.raises(InvalidArgument) as error:
        Request.from_pb(pb)
    assert error.value.field == field


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(width=60), "params.width"),
        (dict(height=4096), "params.height"),
        (dict(num_inference_steps=151), "params.num_inference_steps"),
        (dict(guidance_scale=float("nan")), "params.guidance_scale"),
        (dict(scheduler="nope"), "params.scheduler"),
        (dict(loras=[("a", 1.0), ("a", 2.0)]), "loras[1].lora_id"),
        (dict(loras=[("../x", 1.0)]), "loras[0].lora_id"),
        (dict(loras=[("a", 9.0)]), "loras[0].scale"),
        (dict(controlnets=[ControlNet("c", edge_image(64), -1.0)]), "controlnets[0].conditioning_scale"),
        (dict(controlnets=[ControlNet("c", edge_image(64), 1.0, 0.6, 0.5)]), "controlnets[0].guidance_start"),
        (dict(controlnets=[ControlNet("c", b"not an image")]), "controlnets[0].image"),
        (dict(controlnets=[ControlNet("c", edge_image(64, 32))]), "controlnets[0].image"),
        (dict(controlnet_wire_dtype="int8"), "controlnet_wire_dtype"),
        (dict(preview_every_n_steps=-1), "preview_every_n_steps"),
        (dict(request_id="has space"), "request_id"),
    ],
)
def test_field_rules_name_the_field(change, field):
    request = Request(**{"prompt": "p", "width": 64, "height": 64, **change})
    with pytest.raises(InvalidArgument) as error:
        validate(request, Limits())
    assert error.value.field == field


def test_a_valid_request_passes_and_its_image_is_decoded_once():
    cn = ControlNet("c", edge_image(64))
    validate(Request(width=64, height=64, loras=[("a", -2.0)], controlnets=[cn]), Limits())
    assert cn.decoded_image() is cn.decoded_image() and cn.decoded_image().size == (64, 64)


def test_the_request_model_and_the_gateway_import_no_torch():
    code = "import sys, swiftd.request, swiftd.client, services.gateway.servicer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
