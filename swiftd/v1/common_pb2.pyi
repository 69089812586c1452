from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class ResidualTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIDUAL_TRANSPORT_UNSPECIFIED: _ClassVar[ResidualTransport]
    RESIDUAL_TRANSPORT_INLINE: _ClassVar[ResidualTransport]
    RESIDUAL_TRANSPORT_SHARED_MEMORY: _ClassVar[ResidualTransport]
    RESIDUAL_TRANSPORT_CUDA_IPC: _ClassVar[ResidualTransport]

class Scheduler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULER_UNSPECIFIED: _ClassVar[Scheduler]
    SCHEDULER_DDIM: _ClassVar[Scheduler]
    SCHEDULER_EULER: _ClassVar[Scheduler]
    SCHEDULER_EULER_ANCESTRAL: _ClassVar[Scheduler]
    SCHEDULER_DPMPP_2M: _ClassVar[Scheduler]
    SCHEDULER_PNDM: _ClassVar[Scheduler]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT64: DType
DTYPE_UINT8: DType
RESIDUAL_TRANSPORT_UNSPECIFIED: ResidualTransport
RESIDUAL_TRANSPORT_INLINE: ResidualTransport
RESIDUAL_TRANSPORT_SHARED_MEMORY: ResidualTransport
RESIDUAL_TRANSPORT_CUDA_IPC: ResidualTransport
SCHEDULER_UNSPECIFIED: Scheduler
SCHEDULER_DDIM: Scheduler
SCHEDULER_EULER: Scheduler
SCHEDULER_EULER_ANCESTRAL: Scheduler
SCHEDULER_DPMPP_2M: Scheduler
SCHEDULER_PNDM: Scheduler

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LoraRef(_message.Message):
    __slots__ = ("lora_id", "scale")
    LORA_ID_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    lora_id: str
    scale: float
    def __init__(self, lora_id: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    seconds: float
    def __init__(self, stage: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale", "seed", "scheduler", "model_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: Scheduler
    model_id: str
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., scheduler: _Optional[_Union[Scheduler, str]] = ..., model_id: _Optional[str] = ...) -> None: ...

class ControlNetInput(_message.Message):
    __slots__ = ("controlnet_id", "image", "conditioning_scale", "guidance_start", "guidance_end", "guess_mode")
    CONTROLNET_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_SCALE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_START_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_END_FIELD_NUMBER: _ClassVar[int]
    GUESS_MODE_FIELD_NUMBER: _ClassVar[int]
    controlnet_id: str
    image: bytes
    conditioning_scale: float
    guidance_start: float
    guidance_end: float
    guess_mode: bool
    def __init__(self, controlnet_id: _Optional[str] = ..., image: _Optional[bytes] = ..., conditioning_scale: _Optional[float] = ..., guidance_start: _Optional[float] = ..., guidance_end: _Optional[float] = ..., guess_mode: _Optional[bool] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "elapsed_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    elapsed_seconds: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("step", "image_png")
    STEP_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PNG_FIELD_NUMBER: _ClassVar[int]
    step: int
    image_png: bytes
    def __init__(self, step: _Optional[int] = ..., image_png: _Optional[bytes] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "family", "default_width", "default_height", "dtype", "workers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    family: str
    default_width: int
    default_height: int
    dtype: DType
    workers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., family: _Optional[str] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., workers: _Optional[_Iterable[str]] = ...) -> None: ...

class LoraInfo(_message.Message):
    __slots__ = ("lora_id", "family", "rank", "num_targets", "size_bytes", "format")
    LORA_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_TARGETS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    lora_id: str
    family: str
    rank: int
    num_targets: int
    size_bytes: int
    format: str
    def __init__(self, lora_id: _Optional[str] = ..., family: _Optional[str] = ..., rank: _Optional[int] = ..., num_targets: _Optional[int] = ..., size_bytes: _Optional[int] = ..., format: _Optional[str] = ...) -> None: ...

class ControlNetInfo(_message.Message):
    __slots__ = ("controlnet_id", "family", "size_bytes", "loaded", "workers", "compiled", "transports")
    CONTROLNET_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    controlnet_id: str
    family: str
    size_bytes: int
    loaded: bool
    workers: _containers.RepeatedScalarFieldContainer[str]
    compiled: bool
    transports: _containers.RepeatedScalarFieldContainer[ResidualTransport]
    def __init__(self, controlnet_id: _Optional[str] = ..., family: _Optional[str] = ..., size_bytes: _Optional[int] = ..., loaded: _Optional[bool] = ..., workers: _Optional[_Iterable[str]] = ..., compiled: _Optional[bool] = ..., transports: _Optional[_Iterable[_Union[ResidualTransport, str]]] = ...) -> None: ...
