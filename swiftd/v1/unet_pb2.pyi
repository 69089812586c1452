from swiftd.v1 import common_pb2 as _common_pb2
from swiftd.v1 import lora_store_pb2 as _lora_store_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseRequest(_message.Message):
    __slots__ = ("params", "loras", "lora_bound_steps", "controlnets", "controlnet_wire_dtype", "request_id", "preview_every_n_steps", "return_latents", "lora_store_address", "pushed_lora_ids", "cfg_split")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    LORA_BOUND_STEPS_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_N_STEPS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LATENTS_FIELD_NUMBER: _ClassVar[int]
    LORA_STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUSHED_LORA_IDS_FIELD_NUMBER: _ClassVar[int]
    CFG_SPLIT_FIELD_NUMBER: _ClassVar[int]
    params: _common_pb2.GenerationParams
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraRef]
    lora_bound_steps: int
    controlnets: _containers.RepeatedCompositeFieldContainer[ControlNetAttachment]
    controlnet_wire_dtype: _common_pb2.DType
    request_id: str
    preview_every_n_steps: int
    return_latents: bool
    lora_store_address: str
    pushed_lora_ids: _containers.RepeatedScalarFieldContainer[str]
    cfg_split: CfgSplit
    def __init__(self, params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., loras: _Optional[_Iterable[_Union[_common_pb2.LoraRef, _Mapping]]] = ..., lora_bound_steps: _Optional[int] = ..., controlnets: _Optional[_Iterable[_Union[ControlNetAttachment, _Mapping]]] = ..., controlnet_wire_dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., request_id: _Optional[str] = ..., preview_every_n_steps: _Optional[int] = ..., return_latents: _Optional[bool] = ..., lora_store_address: _Optional[str] = ..., pushed_lora_ids: _Optional[_Iterable[str]] = ..., cfg_split: _Optional[_Union[CfgSplit, _Mapping]] = ...) -> None: ...

class CfgSplit(_message.Message):
    __slots__ = ("partner_address", "partner_controlnet_workers", "partner_pushed_lora_ids")
    PARTNER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PARTNER_CONTROLNET_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PARTNER_PUSHED_LORA_IDS_FIELD_NUMBER: _ClassVar[int]
    partner_address: str
    partner_controlnet_workers: _containers.RepeatedScalarFieldContainer[str]
    partner_pushed_lora_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, partner_address: _Optional[str] = ..., partner_controlnet_workers: _Optional[_Iterable[str]] = ..., partner_pushed_lora_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GuidanceMessage(_message.Message):
    __slots__ = ("start", "step", "done", "accepted")
    START_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    start: GuidanceStart
    step: GuidanceStep
    done: GuidanceDone
    accepted: GuidanceAccepted
    def __init__(self, start: _Optional[_Union[GuidanceStart, _Mapping]] = ..., step: _Optional[_Union[GuidanceStep, _Mapping]] = ..., done: _Optional[_Union[GuidanceDone, _Mapping]] = ..., accepted: _Optional[_Union[GuidanceAccepted, _Mapping]] = ...) -> None: ...

class GuidanceAccepted(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GuidanceStart(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: DenoiseRequest
    def __init__(self, request: _Optional[_Union[DenoiseRequest, _Mapping]] = ...) -> None: ...

class GuidanceStep(_message.Message):
    __slots__ = ("step_index", "noise_pred", "latents_crc32")
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    NOISE_PRED_FIELD_NUMBER: _ClassVar[int]
    LATENTS_CRC32_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    noise_pred: _common_pb2.Tensor
    latents_crc32: int
    def __init__(self, step_index: _Optional[int] = ..., noise_pred: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., latents_crc32: _Optional[int] = ...) -> None: ...

class GuidanceDone(_message.Message):
    __slots__ = ("timings", "lora_applied_at_step", "controlnet_transports")
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LORA_APPLIED_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.StageTiming]
    lora_applied_at_step: int
    controlnet_transports: _containers.RepeatedScalarFieldContainer[_common_pb2.ResidualTransport]
    def __init__(self, timings: _Optional[_Iterable[_Union[_common_pb2.StageTiming, _Mapping]]] = ..., lora_applied_at_step: _Optional[int] = ..., controlnet_transports: _Optional[_Iterable[_Union[_common_pb2.ResidualTransport, str]]] = ...) -> None: ...

class ControlNetAttachment(_message.Message):
    __slots__ = ("input", "worker_address", "fallback_worker_addresses")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_WORKER_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    input: _common_pb2.ControlNetInput
    worker_address: str
    fallback_worker_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, input: _Optional[_Union[_common_pb2.ControlNetInput, _Mapping]] = ..., worker_address: _Optional[str] = ..., fallback_worker_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class DenoiseResponse(_message.Message):
    __slots__ = ("image_png", "latents", "seed", "timings", "request_id", "lora_applied_at_step", "cfg_partner", "controlnet_transports", "cfg_partner_controlnet_transports")
    IMAGE_PNG_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LORA_APPLIED_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    CFG_PARTNER_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    CFG_PARTNER_CONTROLNET_TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    image_png: bytes
    latents: _common_pb2.Tensor
    seed: int
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.StageTiming]
    request_id: str
    lora_applied_at_step: int
    cfg_partner: str
    controlnet_transports: _containers.RepeatedScalarFieldContainer[_common_pb2.ResidualTransport]
    cfg_partner_controlnet_transports: _containers.RepeatedScalarFieldContainer[_common_pb2.ResidualTransport]
    def __init__(self, image_png: _Optional[bytes] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., seed: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.StageTiming, _Mapping]]] = ..., request_id: _Optional[str] = ..., lora_applied_at_step: _Optional[int] = ..., cfg_partner: _Optional[str] = ..., controlnet_transports: _Optional[_Iterable[_Union[_common_pb2.ResidualTransport, str]]] = ..., cfg_partner_controlnet_transports: _Optional[_Iterable[_Union[_common_pb2.ResidualTransport, str]]] = ...) -> None: ...

class DenoiseStreamResponse(_message.Message):
    __slots__ = ("progress", "preview", "final")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    preview: _common_pb2.Preview
    final: DenoiseResponse
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., preview: _Optional[_Union[_common_pb2.Preview, _Mapping]] = ..., final: _Optional[_Union[DenoiseResponse, _Mapping]] = ...) -> None: ...

class ReceiveLoraDeltasResponse(_message.Message):
    __slots__ = ("lora_ids", "parameters_received", "bytes_received")
    LORA_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    lora_ids: _containers.RepeatedScalarFieldContainer[str]
    parameters_received: int
    bytes_received: int
    def __init__(self, lora_ids: _Optional[_Iterable[str]] = ..., parameters_received: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class GetWorkerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetWorkerStatusResponse(_message.Message):
    __slots__ = ("model_ids", "applied_loras", "requests_in_flight", "queue_length", "dtype", "device", "cached_loras", "host", "host_identity")
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_LORAS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CACHED_LORAS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    HOST_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    applied_loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraRef]
    requests_in_flight: int
    queue_length: int
    dtype: _common_pb2.DType
    device: str
    cached_loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraRef]
    host: str
    host_identity: str
    def __init__(self, model_ids: _Optional[_Iterable[str]] = ..., applied_loras: _Optional[_Iterable[_Union[_common_pb2.LoraRef, _Mapping]]] = ..., requests_in_flight: _Optional[int] = ..., queue_length: _Optional[int] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., device: _Optional[str] = ..., cached_loras: _Optional[_Iterable[_Union[_common_pb2.LoraRef, _Mapping]]] = ..., host: _Optional[str] = ..., host_identity: _Optional[str] = ...) -> None: ...

class UNetWorkerListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UNetWorkerListModelsResponse(_message.Message):
    __slots__ = ("models", "controlnets")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    controlnets: _containers.RepeatedCompositeFieldContainer[_common_pb2.ControlNetInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ..., controlnets: _Optional[_Iterable[_Union[_common_pb2.ControlNetInfo, _Mapping]]] = ...) -> None: ...
