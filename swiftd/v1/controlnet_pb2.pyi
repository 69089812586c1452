from swiftd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResidualsRequest(_message.Message):
    __slots__ = ("start", "step")
    START_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    start: SessionStart
    step: StepInput
    def __init__(self, start: _Optional[_Union[SessionStart, _Mapping]] = ..., step: _Optional[_Union[StepInput, _Mapping]] = ...) -> None: ...

class SessionStart(_message.Message):
    __slots__ = ("controlnet_id", "controlnet_cond", "encoder_hidden_states", "text_embeds", "time_ids", "conditioning_scale", "guess_mode", "wire_dtype", "request_id", "transports", "host_identity", "gpu_uuids", "pid_namespace", "idle_rings")
    CONTROLNET_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_COND_FIELD_NUMBER: _ClassVar[int]
    ENCODER_HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    TEXT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    TIME_IDS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_SCALE_FIELD_NUMBER: _ClassVar[int]
    GUESS_MODE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    HOST_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    PID_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    IDLE_RINGS_FIELD_NUMBER: _ClassVar[int]
    controlnet_id: str
    controlnet_cond: _common_pb2.Tensor
    encoder_hidden_states: _common_pb2.Tensor
    text_embeds: _common_pb2.Tensor
    time_ids: _common_pb2.Tensor
    conditioning_scale: float
    guess_mode: bool
    wire_dtype: _common_pb2.DType
    request_id: str
    transports: _containers.RepeatedScalarFieldContainer[_common_pb2.ResidualTransport]
    host_identity: str
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    pid_namespace: str
    idle_rings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, controlnet_id: _Optional[str] = ..., controlnet_cond: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., encoder_hidden_states: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., text_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., time_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., conditioning_scale: _Optional[float] = ..., guess_mode: _Optional[bool] = ..., wire_dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., request_id: _Optional[str] = ..., transports: _Optional[_Iterable[_Union[_common_pb2.ResidualTransport, str]]] = ..., host_identity: _Optional[str] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., pid_namespace: _Optional[str] = ..., idle_rings: _Optional[_Iterable[str]] = ...) -> None: ...

class StepInput(_message.Message):
    __slots__ = ("step_index", "timestep", "sample", "transport", "sample_in_ring", "keep_ring")
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IN_RING_FIELD_NUMBER: _ClassVar[int]
    KEEP_RING_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    timestep: float
    sample: _common_pb2.Tensor
    transport: _common_pb2.ResidualTransport
    sample_in_ring: bool
    keep_ring: bool
    def __init__(self, step_index: _Optional[int] = ..., timestep: _Optional[float] = ..., sample: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., transport: _Optional[_Union[_common_pb2.ResidualTransport, str]] = ..., sample_in_ring: _Optional[bool] = ..., keep_ring: _Optional[bool] = ...) -> None: ...

class ResidualsResponse(_message.Message):
    __slots__ = ("step_index", "down_block_res_samples", "mid_block_res_sample", "compute_seconds", "ring", "slot", "ring_kept")
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    DOWN_BLOCK_RES_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MID_BLOCK_RES_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    RING_KEPT_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    down_block_res_samples: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    mid_block_res_sample: _common_pb2.Tensor
    compute_seconds: float
    ring: ResidualRing
    slot: ResidualSlot
    ring_kept: bool
    def __init__(self, step_index: _Optional[int] = ..., down_block_res_samples: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., mid_block_res_sample: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., compute_seconds: _Optional[float] = ..., ring: _Optional[_Union[ResidualRing, _Mapping]] = ..., slot: _Optional[_Union[ResidualSlot, _Mapping]] = ..., ring_kept: _Optional[bool] = ...) -> None: ...

class ResidualRing(_message.Message):
    __slots__ = ("transport", "name", "slots", "slot_bytes", "header_bytes", "tensors", "cuda_handles", "step_socket", "sample", "cuda_sample", "keepable", "not_kept")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEADER_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CUDA_HANDLES_FIELD_NUMBER: _ClassVar[int]
    STEP_SOCKET_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    CUDA_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    KEEPABLE_FIELD_NUMBER: _ClassVar[int]
    NOT_KEPT_FIELD_NUMBER: _ClassVar[int]
    transport: _common_pb2.ResidualTransport
    name: str
    slots: int
    slot_bytes: int
    header_bytes: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorLayout]
    cuda_handles: _containers.RepeatedScalarFieldContainer[bytes]
    step_socket: str
    sample: TensorLayout
    cuda_sample: bytes
    keepable: bool
    not_kept: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, transport: _Optional[_Union[_common_pb2.ResidualTransport, str]] = ..., name: _Optional[str] = ..., slots: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., header_bytes: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorLayout, _Mapping]]] = ..., cuda_handles: _Optional[_Iterable[bytes]] = ..., step_socket: _Optional[str] = ..., sample: _Optional[_Union[TensorLayout, _Mapping]] = ..., cuda_sample: _Optional[bytes] = ..., keepable: _Optional[bool] = ..., not_kept: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorLayout(_message.Message):
    __slots__ = ("dtype", "shape", "offset")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    dtype: _common_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class ResidualSlot(_message.Message):
    __slots__ = ("index", "sequence")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    sequence: int
    def __init__(self, index: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class ControlNetWorkerListControlNetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ControlNetWorkerListControlNetsResponse(_message.Message):
    __slots__ = ("controlnets", "device", "host", "host_identity")
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    HOST_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    controlnets: _containers.RepeatedCompositeFieldContainer[_common_pb2.ControlNetInfo]
    device: str
    host: str
    host_identity: str
    def __init__(self, controlnets: _Optional[_Iterable[_Union[_common_pb2.ControlNetInfo, _Mapping]]] = ..., device: _Optional[str] = ..., host: _Optional[str] = ..., host_identity: _Optional[str] = ...) -> None: ...

class LoadControlNetRequest(_message.Message):
    __slots__ = ("controlnet_id",)
    CONTROLNET_ID_FIELD_NUMBER: _ClassVar[int]
    controlnet_id: str
    def __init__(self, controlnet_id: _Optional[str] = ...) -> None: ...

class LoadControlNetResponse(_message.Message):
    __slots__ = ("controlnet", "already_loaded", "load_seconds")
    CONTROLNET_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LOADED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    controlnet: _common_pb2.ControlNetInfo
    already_loaded: bool
    load_seconds: float
    def __init__(self, controlnet: _Optional[_Union[_common_pb2.ControlNetInfo, _Mapping]] = ..., already_loaded: _Optional[bool] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class UnloadControlNetRequest(_message.Message):
    __slots__ = ("controlnet_id",)
    CONTROLNET_ID_FIELD_NUMBER: _ClassVar[int]
    controlnet_id: str
    def __init__(self, controlnet_id: _Optional[str] = ...) -> None: ...

class UnloadControlNetResponse(_message.Message):
    __slots__ = ("was_loaded",)
    WAS_LOADED_FIELD_NUMBER: _ClassVar[int]
    was_loaded: bool
    def __init__(self, was_loaded: _Optional[bool] = ...) -> None: ...
