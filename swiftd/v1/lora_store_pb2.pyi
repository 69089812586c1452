from swiftd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoraDeltaChunk(_message.Message):
    __slots__ = ("request_id", "lora_id", "scale", "deltas", "last", "sha256")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LORA_ID_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    lora_id: str
    scale: float
    deltas: _containers.RepeatedCompositeFieldContainer[ParameterDelta]
    last: bool
    sha256: bytes
    def __init__(self, request_id: _Optional[str] = ..., lora_id: _Optional[str] = ..., scale: _Optional[float] = ..., deltas: _Optional[_Iterable[_Union[ParameterDelta, _Mapping]]] = ..., last: _Optional[bool] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class ParameterDelta(_message.Message):
    __slots__ = ("parameter_name", "factored", "full")
    PARAMETER_NAME_FIELD_NUMBER: _ClassVar[int]
    FACTORED_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    parameter_name: str
    factored: FactoredDelta
    full: _common_pb2.Tensor
    def __init__(self, parameter_name: _Optional[str] = ..., factored: _Optional[_Union[FactoredDelta, _Mapping]] = ..., full: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class FactoredDelta(_message.Message):
    __slots__ = ("up", "down")
    UP_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    up: _common_pb2.Tensor
    down: _common_pb2.Tensor
    def __init__(self, up: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., down: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class RegisterLoraRequest(_message.Message):
    __slots__ = ("lora_id",)
    LORA_ID_FIELD_NUMBER: _ClassVar[int]
    lora_id: str
    def __init__(self, lora_id: _Optional[str] = ...) -> None: ...

class RegisterLoraResponse(_message.Message):
    __slots__ = ("lora", "already_registered")
    LORA_FIELD_NUMBER: _ClassVar[int]
    ALREADY_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    lora: _common_pb2.LoraInfo
    already_registered: bool
    def __init__(self, lora: _Optional[_Union[_common_pb2.LoraInfo, _Mapping]] = ..., already_registered: _Optional[bool] = ...) -> None: ...

class LoraStoreListLorasRequest(_message.Message):
    __slots__ = ("family",)
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    family: str
    def __init__(self, family: _Optional[str] = ...) -> None: ...

class LoraStoreListLorasResponse(_message.Message):
    __slots__ = ("loras",)
    LORAS_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraInfo]
    def __init__(self, loras: _Optional[_Iterable[_Union[_common_pb2.LoraInfo, _Mapping]]] = ...) -> None: ...

class RemoveLoraRequest(_message.Message):
    __slots__ = ("lora_id",)
    LORA_ID_FIELD_NUMBER: _ClassVar[int]
    lora_id: str
    def __init__(self, lora_id: _Optional[str] = ...) -> None: ...

class RemoveLoraResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class PrefetchLoraRequest(_message.Message):
    __slots__ = ("lora_id", "base_model_id", "dtype")
    LORA_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    lora_id: str
    base_model_id: str
    dtype: _common_pb2.DType
    def __init__(self, lora_id: _Optional[str] = ..., base_model_id: _Optional[str] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ...) -> None: ...

class PrefetchLoraResponse(_message.Message):
    __slots__ = ("already_hot", "prepare_seconds", "size_bytes")
    ALREADY_HOT_FIELD_NUMBER: _ClassVar[int]
    PREPARE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    already_hot: bool
    prepare_seconds: float
    size_bytes: int
    def __init__(self, already_hot: _Optional[bool] = ..., prepare_seconds: _Optional[float] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class PushLorasRequest(_message.Message):
    __slots__ = ("loras", "base_model_id", "dtype", "unet_worker_address", "request_id")
    LORAS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    UNET_WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraRef]
    base_model_id: str
    dtype: _common_pb2.DType
    unet_worker_address: str
    request_id: str
    def __init__(self, loras: _Optional[_Iterable[_Union[_common_pb2.LoraRef, _Mapping]]] = ..., base_model_id: _Optional[str] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., unet_worker_address: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class PushLorasResponse(_message.Message):
    __slots__ = ("parameters_sent", "bytes_sent", "seconds", "cache_hits")
    PARAMETERS_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    parameters_sent: int
    bytes_sent: int
    seconds: float
    cache_hits: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, parameters_sent: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., seconds: _Optional[float] = ..., cache_hits: _Optional[_Iterable[str]] = ...) -> None: ...

class StreamDeltasRequest(_message.Message):
    __slots__ = ("loras", "base_model_id", "dtype", "request_id")
    LORAS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraRef]
    base_model_id: str
    dtype: _common_pb2.DType
    request_id: str
    def __init__(self, loras: _Optional[_Iterable[_Union[_common_pb2.LoraRef, _Mapping]]] = ..., base_model_id: _Optional[str] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., request_id: _Optional[str] = ...) -> None: ...
