"""The request's vocabulary, in one place: names, defaults, limits, the LoRA set, conversions.

Every part of the suite speaks of a request in these terms: the client builds a `Request` and
sends `to_pb()`, the gateway reads it with `Request.from_pb`, checks it with `validate` and hands
the UNet worker `to_denoise_pb()`, and the worker reads that back with `Request.from_pb` and
checks it again (a request may reach a worker directly). Proto3 zero values mean "unset"; the
rules that give them meaning (a LoRA scale of 0 is 1.0, a guidance end of 0 is 1.0, ...) are
applied once, here, when a value enters the domain type.

Adding a scheduler is one row in `SCHEDULERS` plus its proto enum value; a wire dtype, one row
in `WIRE_DTYPES` (tests/test_request.py checks that every proto enum value has its row).
No torch import: the gateway and the client use this module without it.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import PIL.Image

from swiftd.errors import InvalidArgument, shown
from swiftd.images import decode_image, encode_png, image_header
from swiftd.v1 import common_pb2, gateway_pb2, unet_pb2

# -- names <-> proto enums ------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerRow:
    name: str  # the API's name (client, CLI, logs)
    proto: int  # swiftd.v1.Scheduler value
    diffusers_class: str  # class in the diffusers package, configured from the model's own config


SCHEDULERS: tuple[SchedulerRow, ...] = (
    SchedulerRow("ddim", common_pb2.SCHEDULER_DDIM, "DDIMScheduler"),
    SchedulerRow("euler", common_pb2.SCHEDULER_EULER, "EulerDiscreteScheduler"),
    SchedulerRow("euler_a", common_pb2.SCHEDULER_EULER_ANCESTRAL, "EulerAncestralDiscreteScheduler"),
    SchedulerRow("dpmpp_2m", common_pb2.SCHEDULER_DPMPP_2M, "DPMSolverMultistepScheduler"),
    SchedulerRow("pndm", common_pb2.SCHEDULER_PNDM, "PNDMScheduler"),
)

#: Dtypes ControlNet residuals may travel in; the name is also the torch dtype's name.
WIRE_DTYPES: dict[str, int] = {
    "float32": common_pb2.DTYPE_FLOAT32,
    "float16": common_pb2.DTYPE_FLOAT16,
    "bfloat16": common_pb2.DTYPE_BFLOAT16,
}

FAMILY_SD15 = "sd15"
FAMILY_SDXL = "sdxl"
FAMILIES = (FAMILY_SD15, FAMILY_SDXL)


def scheduler_names() -> list[str]:
    return [row.name for row in SCHEDULERS]


def scheduler_row(name: str) -> SchedulerRow:
    for row in SCHEDULERS:
        if row.name == name:
            return row
    raise InvalidArgument("params.scheduler", f"unknown scheduler {name!r}; one of {scheduler_names()}")


def _scheduler_from_pb(value: int) -> str:
    if value == common_pb2.SCHEDULER_UNSPECIFIED:
        return ""
    for row in SCHEDULERS:
        if row.proto == value:
            return row.name
    raise InvalidArgument("params.scheduler", f"unknown value {value}")


def _wire_dtype_from_pb(value: int) -> str:
    if value == common_pb2.DTYPE_UNSPECIFIED:
        return ""
    for name, proto in WIRE_DTYPES.items():
        if proto == value:
            return name
    raise InvalidArgument("controlnet_wire_dtype", "must be DTYPE_FLOAT32, DTYPE_FLOAT16, DTYPE_BFLOAT16 or unset")


def wire_dtype_to_pb(name: str) -> int:
    """A WIRE_DTYPES name as its DType value; empty: DTYPE_UNSPECIFIED (the UNet's compute dtype)."""
    if not name:
        return common_pb2.DTYPE_UNSPECIFIED
    if name not in WIRE_DTYPES:
        raise InvalidArgument("controlnet_wire_dtype", f"one of {sorted(WIRE_DTYPES)}, or empty")
    return WIRE_DTYPES[name]


def check_family(field_name: str, family: str) -> str:
    """A family filter: one of FAMILIES, or empty for all."""
    if family not in ("", *FAMILIES):
        raise InvalidArgument(field_name, f"{family!r} is not a family ({', '.join(FAMILIES)}, or empty for all)")
    return family


_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]+$")


def check_id(field_name: str, item_id: str) -> str:
    """Ids are plain names, so that no request can point outside a model repository."""
    if not _ID_PATTERN.match(item_id or "") or ".." in item_id:
        raise InvalidArgument(
            field_name, f"{shown(item_id)} is not a valid id (at most 128 of letters, digits, '.', '_', '-')"
        )
    return item_id


# -- defaults and limits --------------------------------------------------------------------------

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 7.5


def or_one(value: float) -> float:
    """Scales and fractions where 0 means unset: 1.0 then (omit the add-on to disable it)."""
    return float(value) or 1.0


@dataclass
class Limits:
    """What a request may ask for; anything outside is INVALID_ARGUMENT naming the field."""

    min_size: int = 64  # pixels per side (and a multiple of 8)
    max_size: int = 2048
    max_steps: int = 150
    max_guidance_scale: float = 30.0
    max_lora_scale: float = 8.0  # |scale|
    max_conditioning_scale: float = 4.0
    max_loras: int = 8
    max_controlnets: int = 4
    max_image_side: int = 4096  # pixels per side of a conditioning image
    # A conditioning image is stretched to the output size, so its shape must match the output's:
    # aspect ratios may differ by this fraction at most.
    max_aspect_mismatch: float = 0.02
    max_request_id_length: int = 128
    # Characters of the prompt and of the negative prompt each. The text encoder reads 77 tokens
    # (a few hundred characters); this bounds what a tokenizer is ever handed.
    max_prompt_length: int = 4096
    max_image_bytes: int = 16 * 1024 * 1024  # one encoded conditioning image

    @property
    def max_request_bytes(self) -> int:
        """The largest valid GenerateRequest, encoded: the public server's message limit."""
        text = 2 * 4 * self.max_prompt_length  # UTF-8: up to 4 bytes a character
        return self.max_controlnets * self.max_image_bytes + text + 64 * 1024  # + ids, numbers, framing


# -- the LoRA set ---------------------------------------------------------------------------------

LoraKey = tuple[str, float]  # one LoRA: (lora_id, scale as compared)
LoraSetKey = tuple[LoraKey, ...]  # a LoRA set, in application order


@dataclass(frozen=True)
class Lora:
    """A LoRA and the scale its delta is multiplied by (0 when constructed means 1.0)."""

    lora_id: str
    scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "scale", or_one(self.scale))

    @property
    def key(self) -> LoraKey:
        # Scales travel as float32: compare at that precision, so 0.7 sent equals 0.7 reported.
        return (self.lora_id, round(self.scale, 6))

    def to_pb(self) -> common_pb2.LoraRef:
        return common_pb2.LoraRef(lora_id=self.lora_id, scale=self.scale)


@dataclass(frozen=True)
class LoraSet:
    """The LoRAs of a request (or those patched into a worker), in application order."""

    loras: tuple[Lora, ...] = ()

    @classmethod
    def of(cls, loras: Iterable[Lora | tuple[str, float]] | LoraSet) -> LoraSet:
        if isinstance(loras, LoraSet):
            return loras
        return cls(tuple(lora if isinstance(lora, Lora) else Lora(*lora) for lora in loras))

    @classmethod
    def from_pb(cls, refs: Iterable[common_pb2.LoraRef]) -> LoraSet:
        return cls(tuple(Lora(ref.lora_id, ref.scale) for ref in refs))

    def to_pb(self) -> list[common_pb2.LoraRef]:
        return [lora.to_pb() for lora in self.loras]

    @property
    def key(self) -> LoraSetKey:
        return tuple(lora.key for lora in self.loras)

    @property
    def ids(self) -> list[str]:
        return [lora.lora_id for lora in self.loras]

    def only(self, lora_ids: Iterable[str]) -> LoraSet:
        keep = set(lora_ids)
        return LoraSet(tuple(lora for lora in self.loras if lora.lora_id in keep))

    def __iter__(self) -> Iterator[Lora]:
        return iter(self.loras)

    def __len__(self) -> int:
        return len(self.loras)

    def __bool__(self) -> bool:
        return bool(self.loras)


# -- ControlNets ----------------------------------------------------------------------------------


@dataclass
class ControlNet:
    """One ControlNet of a request (ControlNetInput), and where it runs once planned."""

    controlnet_id: str
    image: bytes | PIL.Image.Image  # PNG/JPEG bytes as on the wire, or an image already decoded
    conditioning_scale: float = 1.0  # 0 means 1.0
    guidance_start: float = 0.0  # fraction of the schedule where it starts acting
    guidance_end: float = 1.0  # fraction where it stops; 0 means 1.0
    guess_mode: bool = False  # Diffusers guess mode: sees only the conditional half of the CFG batch
    worker_address: str = ""  # ControlNet worker computing its residuals; empty: in-process
    fallback_workers: tuple[str, ...] = ()  # others hosting it, if that worker's stream breaks
    _decoded: PIL.Image.Image | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.conditioning_scale = or_one(self.conditioning_scale)
        self.guidance_end = or_one(self.guidance_end)

    @classmethod
    def from_pb(
        cls, pb: common_pb2.ControlNetInput, worker_address: str = "", fallback_workers: Iterable[str] = ()
    ) -> ControlNet:
        return cls(
            pb.controlnet_id,
            pb.image,
            pb.conditioning_scale,
            pb.guidance_start,
            pb.guidance_end,
            pb.guess_mode,
            worker_address,
            tuple(fallback_workers),
        )

    def to_pb(self) -> common_pb2.ControlNetInput:
        image = self.image
        if isinstance(image, PIL.Image.Image):
            image = encode_png(image)  # lossless: the same pixels arrive
        return common_pb2.ControlNetInput(
            controlnet_id=self.controlnet_id,
            image=image,
            conditioning_scale=self.conditioning_scale,
            guidance_start=self.guidance_start,
            guidance_end=self.guidance_end,
            guess_mode=self.guess_mode,
        )

    def decoded_image(self, field_name: str = "image", max_side: int | None = None) -> PIL.Image.Image:
        """The conditioning image as RGB, decoded once (InvalidArgument naming `field_name`)."""
        if self._decoded is None:
            if isinstance(self.image, PIL.Image.Image):
                self._decoded = self.image.convert("RGB")
            else:
                self._decoded = decode_image(self.image, field_name, max_side)
        return self._decoded

    def active_at(self, step_index: int, num_steps: int) -> bool:
        """Diffusers' `controlnet_keep` rule: active unless the step lies outside the window."""
        return not (step_index / num_steps < self.guidance_start or (step_index + 1) / num_steps > self.guidance_end)


# -- classifier-free guidance split ---------------------------------------------------------------


@dataclass(frozen=True)
class CfgSplit:
    """The partner of a request whose CFG batch is split over two UNet workers (DenoiseRequest
    only): it runs the unconditional half; the worker given the request runs the conditional one."""

    partner_address: str
    partner_controlnet_workers: tuple[str, ...] = ()  # per ControlNet; "" or none: in-process there
    partner_pushed_lora_ids: tuple[str, ...] = ()

    @classmethod
    def from_pb(cls, pb: unet_pb2.CfgSplit) -> CfgSplit | None:
        if not pb.partner_address:
            return None
        return cls(pb.partner_address, tuple(pb.partner_controlnet_workers), tuple(pb.partner_pushed_lora_ids))

    def to_pb(self) -> unet_pb2.CfgSplit:
        return unet_pb2.CfgSplit(
            partner_address=self.partner_address,
            partner_controlnet_workers=self.partner_controlnet_workers,
            partner_pushed_lora_ids=self.partner_pushed_lora_ids,
        )


# -- the request ----------------------------------------------------------------------------------


@dataclass
class Request:
    """One text-to-image request. Zero values mean "server default" until `resolved`."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 0  # pixels, a multiple of 8; 0: the model's native size
    height: int = 0
    num_inference_steps: int = 0  # 0: DEFAULT_STEPS
    guidance_scale: float = 0.0  # 0: DEFAULT_GUIDANCE_SCALE; (0, 1] disables CFG
    seed: int | None = None  # None: drawn by the server and returned
    scheduler: str = ""  # a SCHEDULERS name; empty: the model's own scheduler
    model_id: str = ""  # empty: the server's default model
    loras: LoraSet = field(default_factory=LoraSet)
    controlnets: list[ControlNet] = field(default_factory=list)
    # Bounded asynchronous LoRA loading: UNet deltas are patched in at the first step boundary
    # after they are complete, and before step K at the latest; 0 = synchronous; None = the
    # server's default. Text-encoder deltas are always in place before text encoding.
    lora_bound_steps: int | None = None
    request_id: str = ""
    preview_every_n_steps: int = 0  # streaming calls: a preview every N steps; 0 = none
    controlnet_wire_dtype: str = ""  # a WIRE_DTYPES name; empty: the UNet's compute dtype
    # Set by the gateway's plan (DenoiseRequest only): where missing LoRA deltas come from.
    lora_store_address: str = ""  # pull from this store; empty: the worker's own default
    pushed_lora_ids: tuple[str, ...] = ()  # on their way from the store: wait for them, don't pull
    cfg_split: CfgSplit | None = None  # the CFG batch's unconditional half on this partner
    return_latents: bool = False  # also return the final latents (equivalence checks)

    def __post_init__(self):
        self.loras = LoraSet.of(self.loras)
        self.scheduler = self.scheduler or ""
        self.pushed_lora_ids = tuple(self.pushed_lora_ids)
        if self.lora_bound_steps is not None and self.lora_bound_steps < 0:
            self.lora_bound_steps = None  # negative = unset, as on the wire

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    # -- conversions ------------------------------------------------------------------------------

    @classmethod
    def from_pb(cls, pb: gateway_pb2.GenerateRequest | unet_pb2.DenoiseRequest) -> Request:
        """A GenerateRequest (public API) or DenoiseRequest (planned, for a UNet worker).

        Unknown enum values are INVALID_ARGUMENT naming the field; other rules are `validate`'s.
        """
        p = pb.params
        if isinstance(pb, unet_pb2.DenoiseRequest):
            controlnets = [
                ControlNet.from_pb(a.input, a.worker_address, a.fallback_worker_addresses) for a in pb.controlnets
            ]
            routing = dict(
                lora_store_address=pb.lora_store_address,
                pushed_lora_ids=tuple(pb.pushed_lora_ids),
                cfg_split=CfgSplit.from_pb(pb.cfg_split),
                return_latents=pb.return_latents,
            )
        else:
            controlnets = [ControlNet.from_pb(cn) for cn in pb.controlnets]
            routing = {}
        return cls(
            prompt=p.prompt,
            negative_prompt=p.negative_prompt,
            width=p.width,
            height=p.height,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            seed=p.seed if p.HasField("seed") else None,
            scheduler=_scheduler_from_pb(p.scheduler),
            model_id=p.model_id,
            loras=LoraSet.from_pb(pb.loras),
            controlnets=controlnets,
            lora_bound_steps=pb.lora_bound_steps if pb.HasField("lora_bound_steps") else None,
            request_id=pb.request_id,
            preview_every_n_steps=pb.preview_every_n_steps,
            controlnet_wire_dtype=_wire_dtype_from_pb(pb.controlnet_wire_dtype),
            **routing,
        )

    def params_pb(self) -> common_pb2.GenerationParams:
        params = common_pb2.GenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            scheduler=scheduler_row(self.scheduler).proto if self.scheduler else common_pb2.SCHEDULER_UNSPECIFIED,
            model_id=self.model_id,
        )
        if self.seed is not None:
            params.seed = self.seed
        return params

    def to_pb(self) -> gateway_pb2.GenerateRequest:
        """The public API's GenerateRequest."""
        pb = gateway_pb2.GenerateRequest(
            params=self.params_pb(),
            loras=self.loras.to_pb(),
            controlnets=[cn.to_pb() for cn in self.controlnets],
            request_id=self.request_id,
            preview_every_n_steps=self.preview_every_n_steps,
            controlnet_wire_dtype=wire_dtype_to_pb(self.controlnet_wire_dtype),
        )
        if self.lora_bound_steps is not None:
            pb.lora_bound_steps = self.lora_bound_steps
        return pb

    def to_denoise_pb(self) -> unet_pb2.DenoiseRequest:
        """The UNet worker's DenoiseRequest: this request as planned (workers and LoRA routing)."""
        pb = unet_pb2.DenoiseRequest(
            params=self.params_pb(),
            loras=self.loras.to_pb(),
            controlnets=[
                unet_pb2.ControlNetAttachment(
                    input=cn.to_pb(), worker_address=cn.worker_address, fallback_worker_addresses=cn.fallback_workers
                )
                for cn in self.controlnets
            ],
            controlnet_wire_dtype=wire_dtype_to_pb(self.controlnet_wire_dtype),
            request_id=self.request_id,
            preview_every_n_steps=self.preview_every_n_steps,
            return_latents=self.return_latents,
            lora_store_address=self.lora_store_address,
            pushed_lora_ids=self.pushed_lora_ids,
        )
        if self.cfg_split is not None:
            pb.cfg_split.CopyFrom(self.cfg_split.to_pb())
        if self.lora_bound_steps is not None:
            pb.lora_bound_steps = self.lora_bound_steps
        return pb

    # -- defaults -------------------------------------------------------------------------------

    def resolved(self, native_size: int, default_lora_bound_steps: int = 0) -> Request:
        """Every default filled in: what actually runs (the seed drawn if none was given)."""
        return replace(
            self,
            width=self.width or native_size,
            height=self.height or native_size,
            num_inference_steps=self.num_inference_steps or DEFAULT_STEPS,
            guidance_scale=self.guidance_scale or DEFAULT_GUIDANCE_SCALE,
            seed=self.seed if self.seed is not None else uuid.uuid4().int % (2**31),
            lora_bound_steps=self.lora_bound_steps if self.lora_bound_steps is not None else default_lora_bound_steps,
        )


# -- validation -----------------------------------------------------------------------------------


def ensure_request_id(request: Request, limits: Limits) -> str:
    """The request's id, checked; one is assigned when the client gave none."""
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    elif len(request.request_id) > limits.max_request_id_length or not _REQUEST_ID.match(request.request_id):
        raise InvalidArgument("request_id", f"at most {limits.max_request_id_length} characters of A-Z a-z 0-9 . _ : -")
    return request.request_id


def check_text(request: Request, limits: Limits) -> None:
    """The fields checked before anything else reads them: ids and prompts."""
    if request.request_id:
        ensure_request_id(request, limits)
    if request.model_id:
        check_id("params.model_id", request.model_id)
    for name in ("prompt", "negative_prompt"):
        if len(getattr(request, name)) > limits.max_prompt_length:
            raise InvalidArgument(
                f"params.{name}", f"{len(getattr(request, name))} characters; at most {limits.max_prompt_length}"
            )


def validate(
    request: Request, limits: Limits, controlnet_field: str = "controlnets[{i}]", decode_images: bool = True
) -> None:
    """Field rules and limits; the first problem is INVALID_ARGUMENT naming its field.

    `width` and `height` must be resolved (0 is not a size). `controlnet_field` is where a
    ControlNet sits in the message checked ("controlnets[{i}].input" in a DenoiseRequest); its
    conditioning image is decoded here, once, bounded by `max_image_side` (`decode_images`
    False: only its header is read, as a gateway that forwards the bytes does).
    """
    check_text(request, limits)
    for name in ("width", "height"):
        value = getattr(request, name)
        if value % 8 or not limits.min_size <= value <= limits.max_size:
            raise InvalidArgument(
                f"params.{name}", f"{value} must be a multiple of 8 in [{limits.min_size}, {limits.max_size}]"
            )
    steps = request.num_inference_steps
    if not 0 <= steps <= limits.max_steps:
        raise InvalidArgument("params.num_inference_steps", f"{steps} must be in [1, {limits.max_steps}] (0 = default)")
    guidance = request.guidance_scale
    if not (math.isfinite(guidance) and 0 <= guidance <= limits.max_guidance_scale):
        raise InvalidArgument("params.guidance_scale", f"{guidance} must be in [0, {limits.max_guidance_scale}]")
    if request.scheduler:
        scheduler_row(request.scheduler)
    _validate_loras(request.loras, limits)
    _validate_controlnets(request, limits, controlnet_field, decode_images)
    wire_dtype_to_pb(request.controlnet_wire_dtype)
    if request.preview_every_n_steps < 0:
        raise InvalidArgument("preview_every_n_steps", "must be >= 0")


def check_conditioning_pixels(request: Request, limits: Limits, controlnet_field: str = "controlnets[{i}]") -> None:
    """Decode each conditioning image given as bytes, bounded by `max_image_side`, and let it go
    (for a gateway that checked only headers and forwards the bytes): truncated or corrupt pixel
    data is INVALID_ARGUMENT naming the field, before a worker is touched."""
    for i, cn in enumerate(request.controlnets):
        if isinstance(cn.image, bytes):
            decode_image(cn.image, f"{controlnet_field.format(i=i)}.image", limits.max_image_side)


def _validate_loras(loras: LoraSet, limits: Limits) -> None:
    if len(loras) > limits.max_loras:
        raise InvalidArgument("loras", f"{len(loras)} LoRAs; at most {limits.max_loras}")
    seen = set()
    for i, lora in enumerate(loras):
        where = f"loras[{i}]"
        if not lora.lora_id:
            raise InvalidArgument(f"{where}.lora_id", "is required")
        check_id(f"{where}.lora_id", lora.lora_id)
        if lora.lora_id in seen:
            raise InvalidArgument(
                f"{where}.lora_id", f"{lora.lora_id!r} is listed twice (give one entry with the summed scale)"
            )
        seen.add(lora.lora_id)
        if not (math.isfinite(lora.scale) and abs(lora.scale) <= limits.max_lora_scale):
            raise InvalidArgument(
                f"{where}.scale", f"{lora.scale} must be in [-{limits.max_lora_scale}, {limits.max_lora_scale}]"
            )


def _validate_controlnets(request: Request, limits: Limits, controlnet_field: str, decode_images: bool) -> None:
    if len(request.controlnets) > limits.max_controlnets:
        raise InvalidArgument(
            "controlnets", f"{len(request.controlnets)} ControlNets; at most {limits.max_controlnets}"
        )
    for i, cn in enumerate(request.controlnets):
        where = controlnet_field.format(i=i)
        if not cn.controlnet_id:
            raise InvalidArgument(f"{where}.controlnet_id", "is required")
        check_id(f"{where}.controlnet_id", cn.controlnet_id)
        scale = cn.conditioning_scale
        if not (math.isfinite(scale) and 0 <= scale <= limits.max_conditioning_scale):
            raise InvalidArgument(
                f"{where}.conditioning_scale", f"{scale} must be in [0, {limits.max_conditioning_scale}]"
            )
        if not (0.0 <= cn.guidance_start < cn.guidance_end <= 1.0):
            raise InvalidArgument(
                f"{where}.guidance_start",
                f"need 0 <= guidance_start < guidance_end <= 1, got {cn.guidance_start}, {cn.guidance_end}",
            )
        _check_conditioning_image(cn, f"{where}.image", request.width, request.height, limits, decode_images)


def _check_conditioning_image(
    cn: ControlNet, field_name: str, width: int, height: int, limits: Limits, decode: bool
) -> None:
    if isinstance(cn.image, bytes) and len(cn.image) > limits.max_image_bytes:
        raise InvalidArgument(field_name, f"is {len(cn.image)} bytes; at most {limits.max_image_bytes}")
    if decode or not isinstance(cn.image, bytes):
        w, h = cn.decoded_image(field_name, limits.max_image_side).size
    else:
        w, h = image_header(cn.image, field_name, limits.max_image_side).size
    if min(w, h) < 8 or max(w, h) > limits.max_image_side:
        raise InvalidArgument(field_name, f"is {w}x{h}; each side must be in [8, {limits.max_image_side}]")
    mismatch = abs((w / h) / (width / height) - 1.0)
    if mismatch > limits.max_aspect_mismatch:
        raise InvalidArgument(
            field_name,
            f"is {w}x{h}, aspect ratio {w / h:.3f}; the output {width}x{height} needs {width / height:.3f} "
            f"(it would be stretched; crop or pad it first)",
        )
