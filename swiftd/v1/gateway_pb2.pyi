from swiftd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_UNSPECIFIED: _ClassVar[Placement]
    PLACEMENT_PACK: _ClassVar[Placement]
    PLACEMENT_SPREAD: _ClassVar[Placement]
    PLACEMENT_CFG_SPLIT: _ClassVar[Placement]
PLACEMENT_UNSPECIFIED: Placement
PLACEMENT_PACK: Placement
PLACEMENT_SPREAD: Placement
PLACEMENT_CFG_SPLIT: Placement

class GenerateRequest(_message.Message):
    __slots__ = ("params", "loras", "controlnets", "lora_bound_steps", "request_id", "preview_every_n_steps", "controlnet_wire_dtype")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    LORA_BOUND_STEPS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_N_STEPS_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    params: _common_pb2.GenerationParams
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraRef]
    controlnets: _containers.RepeatedCompositeFieldContainer[_common_pb2.ControlNetInput]
    lora_bound_steps: int
    request_id: str
    preview_every_n_steps: int
    controlnet_wire_dtype: _common_pb2.DType
    def __init__(self, params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., loras: _Optional[_Iterable[_Union[_common_pb2.LoraRef, _Mapping]]] = ..., controlnets: _Optional[_Iterable[_Union[_common_pb2.ControlNetInput, _Mapping]]] = ..., lora_bound_steps: _Optional[int] = ..., request_id: _Optional[str] = ..., preview_every_n_steps: _Optional[int] = ..., controlnet_wire_dtype: _Optional[_Union[_common_pb2.DType, str]] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("unet_worker", "controlnets", "lora_ids", "lora_set_already_applied", "pushed_lora_ids", "placement", "reason", "cfg_partner", "failed_over_from")
    UNET_WORKER_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    LORA_IDS_FIELD_NUMBER: _ClassVar[int]
    LORA_SET_ALREADY_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PUSHED_LORA_IDS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CFG_PARTNER_FIELD_NUMBER: _ClassVar[int]
    FAILED_OVER_FROM_FIELD_NUMBER: _ClassVar[int]
    unet_worker: str
    controlnets: _containers.RepeatedCompositeFieldContainer[ControlNetAssignment]
    lora_ids: _containers.RepeatedScalarFieldContainer[str]
    lora_set_already_applied: bool
    pushed_lora_ids: _containers.RepeatedScalarFieldContainer[str]
    placement: Placement
    reason: str
    cfg_partner: CfgPartner
    failed_over_from: str
    def __init__(self, unet_worker: _Optional[str] = ..., controlnets: _Optional[_Iterable[_Union[ControlNetAssignment, _Mapping]]] = ..., lora_ids: _Optional[_Iterable[str]] = ..., lora_set_already_applied: _Optional[bool] = ..., pushed_lora_ids: _Optional[_Iterable[str]] = ..., placement: _Optional[_Union[Placement, str]] = ..., reason: _Optional[str] = ..., cfg_partner: _Optional[_Union[CfgPartner, _Mapping]] = ..., failed_over_from: _Optional[str] = ...) -> None: ...

class CfgPartner(_message.Message):
    __slots__ = ("unet_worker", "controlnets", "lora_set_already_applied", "pushed_lora_ids")
    UNET_WORKER_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    LORA_SET_ALREADY_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PUSHED_LORA_IDS_FIELD_NUMBER: _ClassVar[int]
    unet_worker: str
    controlnets: _containers.RepeatedCompositeFieldContainer[ControlNetAssignment]
    lora_set_already_applied: bool
    pushed_lora_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, unet_worker: _Optional[str] = ..., controlnets: _Optional[_Iterable[_Union[ControlNetAssignment, _Mapping]]] = ..., lora_set_already_applied: _Optional[bool] = ..., pushed_lora_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ControlNetAssignment(_message.Message):
    __slots__ = ("controlnet_id", "worker", "transport")
    CONTROLNET_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    controlnet_id: str
    worker: str
    transport: _common_pb2.ResidualTransport
    def __init__(self, controlnet_id: _Optional[str] = ..., worker: _Optional[str] = ..., transport: _Optional[_Union[_common_pb2.ResidualTransport, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("image_png", "seed", "timings", "trace_id", "request_id", "plan", "lora_applied_at_step")
    IMAGE_PNG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    LORA_APPLIED_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    image_png: bytes
    seed: int
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.StageTiming]
    trace_id: str
    request_id: str
    plan: Plan
    lora_applied_at_step: int
    def __init__(self, image_png: _Optional[bytes] = ..., seed: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.StageTiming, _Mapping]]] = ..., trace_id: _Optional[str] = ..., request_id: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., lora_applied_at_step: _Optional[int] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("queued", "started", "progress", "preview", "final")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    queued: Queued
    started: Started
    progress: _common_pb2.Progress
    preview: _common_pb2.Preview
    final: GenerateResponse
    def __init__(self, queued: _Optional[_Union[Queued, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., preview: _Optional[_Union[_common_pb2.Preview, _Mapping]] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("plan", "queued_seconds")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    queued_seconds: float
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ..., queued_seconds: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ...) -> None: ...

class ListLorasRequest(_message.Message):
    __slots__ = ("family",)
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    family: str
    def __init__(self, family: _Optional[str] = ...) -> None: ...

class ListLorasResponse(_message.Message):
    __slots__ = ("loras",)
    LORAS_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraInfo]
    def __init__(self, loras: _Optional[_Iterable[_Union[_common_pb2.LoraInfo, _Mapping]]] = ...) -> None: ...

class ListControlNetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListControlNetsResponse(_message.Message):
    __slots__ = ("controlnets",)
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    controlnets: _containers.RepeatedCompositeFieldContainer[_common_pb2.ControlNetInfo]
    def __init__(self, controlnets: _Optional[_Iterable[_Union[_common_pb2.ControlNetInfo, _Mapping]]] = ...) -> None: ...
