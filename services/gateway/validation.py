"""Up-front checks of a request at the gateway, before any worker is touched: the field rules
(`swiftd.request.validate`, INVALID_ARGUMENT naming the field) and the catalog (NOT_FOUND naming
an unknown id; INVALID_ARGUMENT for an add-on of another model family).

The result is the request as it will run: model, size and request id resolved, every id known
to exist and to fit the model's family.
"""

from __future__ import annotations

from services.gateway.catalog import Catalog, Listing
from swiftd.errors import InvalidArgument, NotFound, Unavailable, shown
from swiftd.request import Limits, Request, check_text, ensure_request_id, validate
from swiftd.v1 import common_pb2, gateway_pb2


def validate_request(
    pb: gateway_pb2.GenerateRequest, catalog: Catalog, limits: Limits, default_model: str
) -> tuple[Request, common_pb2.ModelInfo]:
    request = Request.from_pb(pb)
    ensure_request_id(request, limits)
    check_text(request, limits)  # before an id is looked up or echoed
    listing = catalog.get()
    model = _model(request, listing, catalog, default_model)
    request.width = request.width or model.default_width
    request.height = request.height or model.default_height
    # Header-only image checks: pixels are decoded after admission (servicer), never for a refused request.
    validate(request, limits, decode_images=False)
    if request.loras and not catalog.lora_store:
        raise InvalidArgument("loras", "this gateway has no LoRA store configured")
    for i, lora in enumerate(request.loras):
        info = _known(lora.lora_id, "loras", listing, catalog, f"loras[{i}].lora_id")
        _check_family(f"loras[{i}].lora_id", "LoRA", lora.lora_id, info.family, model)
    for i, cn in enumerate(request.controlnets):
        info = _known(cn.controlnet_id, "controlnets", listing, catalog, f"controlnets[{i}].controlnet_id")
        _check_family(f"controlnets[{i}].controlnet_id", "ControlNet", cn.controlnet_id, info.family, model)
    return request, model


def _known(item_id: str, kind: str, listing: Listing, catalog: Catalog, field: str):
    """Look `item_id` up in the listing's `kind` table, refreshing it once before giving up."""
    table = getattr(listing, kind)
    if item_id not in table:
        listing = catalog.get(force=True)
        table = getattr(listing, kind)
        if item_id not in table:
            if kind in listing.incomplete:  # it may be on a service that did not answer
                raise Unavailable(
                    f"{field}: cannot look up {shown(item_id)} now: a service listing {kind} is unreachable"
                )
            raise NotFound(field, item_id)
    return table[item_id]


def _model(request: Request, listing: Listing, catalog: Catalog, default_model: str) -> common_pb2.ModelInfo:
    if not request.model_id:
        models = listing.models or catalog.get(force=True).models
        if not models:
            raise Unavailable("no UNet worker is reachable")
        request.model_id = default_model or sorted(models)[0]
    return _known(request.model_id, "models", listing, catalog, "params.model_id")


def _check_family(field: str, kind: str, item_id: str, family: str, model: common_pb2.ModelInfo) -> None:
    if family and model.family and family != model.family:
        raise InvalidArgument(
            field, f"{kind} {item_id!r} is for {family}; params.model_id {model.model_id!r} is {model.family}"
        )
