"""Up-front checks of a GenerateRequest: every problem is INVALID_ARGUMENT naming the field, every
unknown id NOT_FOUND naming it, before any worker is touched.

The result is the request as it will run: defaults resolved (model, size), ids known to exist
and to fit the model's family.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass

from services.gateway.catalog import Catalog, Listing
from services.gateway.config import Limits
from swiftd.errors import InvalidArgument, NotFound, Unavailable
from swiftd.images import decode_image
from swiftd.v1 import common_pb2, gateway_pb2

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]+$")
_WIRE_DTYPES = (common_pb2.DTYPE_UNSPECIFIED, common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_FLOAT16, common_pb2.DTYPE_BFLOAT16)


@dataclass
class ValidRequest:
    request: gateway_pb2.GenerateRequest  # params.model_id, width and height filled in
    request_id: str
    model: common_pb2.ModelInfo

    @property
    def lora_key(self) -> tuple[tuple[str, float], ...]:
        """The LoRA set as UNet workers report it (ids and effective scales)."""
        return tuple((lora.lora_id, round(lora.scale or 1.0, 6)) for lora in self.request.loras)


def validate(request: gateway_pb2.GenerateRequest, catalog: Catalog, limits: Limits, default_model: str) -> ValidRequest:
    request_id = _request_id(request.request_id, limits)
    checked = gateway_pb2.GenerateRequest()
    checked.CopyFrom(request)
    listing = catalog.get()
    model = _model(checked.params, listing, catalog, default_model)
    _params(checked.params, model, limits)
    _loras(checked, model, listing, catalog, limits)
    _controlnets(checked, model, listing, catalog, limits)
    if checked.controlnet_wire_dtype not in _WIRE_DTYPES:
        raise InvalidArgument("controlnet_wire_dtype", "must be DTYPE_FLOAT32, DTYPE_FLOAT16, DTYPE_BFLOAT16 or unset")
    if checked.preview_every_n_steps < 0:
        raise InvalidArgument("preview_every_n_steps", "must be >= 0")
    checked.request_id = request_id
    return ValidRequest(checked, request_id, model)


def _request_id(value: str, limits: Limits) -> str:
    if not value:
        return uuid.uuid4().hex
    if len(value) > limits.max_request_id_length or not _REQUEST_ID.match(value):
        raise InvalidArgument("request_id", f"at most {limits.max_request_id_length} characters of A-Z a-z 0-9 . _ : -")
    return value


def _known(item_id: str, kind: str, listing: Listing, catalog: Catalog, field: str):
    """Look `item_id` up in the listing's `kind` table, refreshing it once before giving up."""
    table = getattr(listing, kind)
    if item_id not in table:
        listing = catalog.get(force=True)
        table = getattr(listing, kind)
        if item_id not in table:
            if kind in listing.incomplete:  # it may be on a service that did not answer
                raise Unavailable(f"{field}: cannot look up {item_id!r} now: a service listing {kind} is unreachable")
            raise NotFound(field, item_id)
    return table[item_id]


def _model(params: common_pb2.GenerationParams, listing: Listing, catalog: Catalog, default_model: str) -> common_pb2.ModelInfo:
    if not params.model_id:
        models = listing.models or catalog.get(force=True).models
        if not models:
            raise Unavailable("no UNet worker is reachable")
        params.model_id = default_model or sorted(models)[0]
    return _known(params.model_id, "models", listing, catalog, "params.model_id")


def _params(p: common_pb2.GenerationParams, model: common_pb2.ModelInfo, limits: Limits) -> None:
    p.width = p.width or model.default_width
    p.height = p.height or model.default_height
    for name in ("width", "height"):
        value = getattr(p, name)
        if value % 8 or not limits.min_size <= value <= limits.max_size:
            raise InvalidArgument(f"params.{name}", f"{value} must be a multiple of 8 in [{limits.min_size}, {limits.max_size}]")
    if not 0 <= p.num_inference_steps <= limits.max_steps:
        raise InvalidArgument("params.num_inference_steps", f"{p.num_inference_steps} must be in [1, {limits.max_steps}] (0 = default)")
    if not (math.isfinite(p.guidance_scale) and 0 <= p.guidance_scale <= limits.max_guidance_scale):
        raise InvalidArgument("params.guidance_scale", f"{p.guidance_scale} must be in [0, {limits.max_guidance_scale}]")
    if p.scheduler not in common_pb2.Scheduler.values():
        raise InvalidArgument("params.scheduler", f"unknown value {p.scheduler}")


def _family_mismatch(field: str, kind: str, item_id: str, family: str, model: common_pb2.ModelInfo) -> InvalidArgument:
    return InvalidArgument(field, f"{kind} {item_id!r} is for {family}; params.model_id {model.model_id!r} is {model.family}")


def _loras(r: gateway_pb2.GenerateRequest, model, listing: Listing, catalog: Catalog, limits: Limits) -> None:
    if len(r.loras) > limits.max_loras:
        raise InvalidArgument("loras", f"{len(r.loras)} LoRAs; at most {limits.max_loras}")
    seen = set()
    for i, lora in enumerate(r.loras):
        field = f"loras[{i}]"
        if not lora.lora_id:
            raise InvalidArgument(f"{field}.lora_id", "is required")
        if lora.lora_id in seen:
            raise InvalidArgument(f"{field}.lora_id", f"{lora.lora_id!r} is listed twice (give one entry with the summed scale)")
        seen.add(lora.lora_id)
        if not (math.isfinite(lora.scale) and abs(lora.scale) <= limits.max_lora_scale):
            raise InvalidArgument(f"{field}.scale", f"{lora.scale} must be in [-{limits.max_lora_scale}, {limits.max_lora_scale}]")
        if not catalog.lora_store:
            raise InvalidArgument("loras", "this gateway has no LoRA store configured")
        info = _known(lora.lora_id, "loras", listing, catalog, f"{field}.lora_id")
        if info.family and model.family and info.family != model.family:
            raise _family_mismatch(f"{field}.lora_id", "LoRA", lora.lora_id, info.family, model)


def _controlnets(r: gateway_pb2.GenerateRequest, model, listing: Listing, catalog: Catalog, limits: Limits) -> None:
    if len(r.controlnets) > limits.max_controlnets:
        raise InvalidArgument("controlnets", f"{len(r.controlnets)} ControlNets; at most {limits.max_controlnets}")
    for i, cn in enumerate(r.controlnets):
        field = f"controlnets[{i}]"
        if not cn.controlnet_id:
            raise InvalidArgument(f"{field}.controlnet_id", "is required")
        if not (math.isfinite(cn.conditioning_scale) and 0 <= cn.conditioning_scale <= limits.max_conditioning_scale):
            raise InvalidArgument(f"{field}.conditioning_scale", f"{cn.conditioning_scale} must be in [0, {limits.max_conditioning_scale}]")
        end = cn.guidance_end or 1.0
        if not (0.0 <= cn.guidance_start < end <= 1.0):
            raise InvalidArgument(f"{field}.guidance_start", f"need 0 <= guidance_start < guidance_end <= 1, got {cn.guidance_start}, {end}")
        info = _known(cn.controlnet_id, "controlnets", listing, catalog, f"{field}.controlnet_id")
        if info.family and model.family and info.family != model.family:
            raise _family_mismatch(f"{field}.controlnet_id", "ControlNet", cn.controlnet_id, info.family, model)
        _conditioning_image(cn.image, f"{field}.image", r.params.width, r.params.height, limits)


def _conditioning_image(data: bytes, field: str, width: int, height: int, limits: Limits) -> None:
    image = decode_image(data, field, limits.max_image_side)
    w, h = image.size
    if min(w, h) < 8:
        raise InvalidArgument(field, f"is {w}x{h}; each side must be in [8, {limits.max_image_side}]")
    mismatch = abs((w / h) / (width / height) - 1.0)
    if mismatch > limits.max_aspect_mismatch:
        raise InvalidArgument(
            field, f"is {w}x{h}, aspect ratio {w / h:.3f}; the output {width}x{height} needs {width / height:.3f} "
            f"(it would be stretched; crop or pad it first)",
        )  # fmt: skip
