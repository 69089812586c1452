"""Tensor wire codec: ``torch.Tensor`` <-> ``swiftd.v1.Tensor`` (dtype + shape + raw bytes).

The wire format is little-endian, C-contiguous element bytes, so fp32/fp16/bf16/int64/uint8
round-trip bit-exactly (NaN payloads, infinities and negative zero included). Encoding optionally
casts to a narrower wire dtype first (e.g. fp32 residuals sent as fp16); the cast happens on the
tensor's own device, before the copy to host memory.

Malformed messages raise ``ValueError`` with a message naming the problem; servers map it to
``INVALID_ARGUMENT``.

Copies: encoding makes one host copy (the ``bytes`` object) besides protobuf's own. Decoding views
the message's bytes without copying and then makes exactly one copy: the dtype/device conversion
when one is asked for, otherwise a plain copy (the bytes object is immutable, and a tensor over it
could be written in place by a caller).
"""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch

from swiftd.errors import InvalidArgument
from swiftd.v1 import common_pb2

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise RuntimeError("swiftd.codec assumes a little-endian host (the wire format is little-endian)")

__all__ = [
    "SUPPORTED_DTYPES",
    "dtype_from_proto",
    "dtype_to_proto",
    "tensor_from_field",
    "tensor_from_proto",
    "tensor_nbytes",
    "tensor_to_proto",
]

_TO_PROTO: dict[torch.dtype, int] = {
    torch.float32: common_pb2.DTYPE_FLOAT32,
    torch.float16: common_pb2.DTYPE_FLOAT16,
    torch.bfloat16: common_pb2.DTYPE_BFLOAT16,
    torch.int64: common_pb2.DTYPE_INT64,
    torch.uint8: common_pb2.DTYPE_UINT8,
}
_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in _TO_PROTO.items()}

#: Torch dtypes the wire format can carry.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_TO_PROTO)


def _proto_dtype_name(value: int) -> str:
    try:
        return common_pb2.DType.Name(value)
    except ValueError:
        return str(value)


def dtype_to_proto(dtype: torch.dtype) -> int:
    """The ``swiftd.v1.DType`` enum value of a torch dtype; ``ValueError`` if unsupported."""
    try:
        return _TO_PROTO[dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"dtype {dtype} cannot be sent on the wire (supported: {supported})") from None


def dtype_from_proto(value: int, *, allow_unspecified: bool = False) -> torch.dtype | None:
    """The torch dtype of a ``swiftd.v1.DType`` value.

    ``DTYPE_UNSPECIFIED`` returns ``None`` when ``allow_unspecified`` (for request fields where it
    means "server default"), and raises ``ValueError`` otherwise, as does an unknown value.
    """
    if value == common_pb2.DTYPE_UNSPECIFIED:
        if allow_unspecified:
            return None
        raise ValueError("dtype is DTYPE_UNSPECIFIED")
    try:
        return _FROM_PROTO[value]
    except KeyError:
        raise ValueError(f"unknown dtype enum value {value}") from None


def tensor_nbytes(msg: common_pb2.Tensor) -> int:
    """Expected ``len(msg.data)`` for the message's dtype and shape (validates both)."""
    dtype = _checked_dtype(msg)
    return _checked_numel(msg) * dtype.itemsize


def tensor_to_proto(t: torch.Tensor, wire_dtype: torch.dtype | int | None = None) -> common_pb2.Tensor:
    """Encode a tensor as a ``swiftd.v1.Tensor``.

    ``wire_dtype``: dtype of the bytes on the wire (a torch dtype or a ``swiftd.v1.DType`` value);
    ``None`` or ``DTYPE_UNSPECIFIED`` keeps the tensor's dtype. Float narrowing follows torch's
    rounding (fp32 -> fp16 overflows to +-inf above 65504). Accepts any layout (non-contiguous,
    0-d, empty, requires_grad, any device); sparse tensors are rejected.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"only dense (strided) tensors can be encoded, got layout {t.layout}")
    if isinstance(wire_dtype, int):
        wire_dtype = dtype_from_proto(wire_dtype, allow_unspecified=True)
    t = t.detach()
    if wire_dtype is not None and wire_dtype != t.dtype:
        dtype_to_proto(wire_dtype)  # validate before doing any work
        t = t.to(wire_dtype)  # on the source device: narrowing first moves fewer bytes to host
    enum = dtype_to_proto(t.dtype)
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    # One copy: the flat uint8 view is free, tobytes() copies once into the bytes object.
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return common_pb2.Tensor(dtype=enum, shape=t.shape, data=data)


def tensor_from_proto(
    msg: common_pb2.Tensor,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Decode a ``swiftd.v1.Tensor`` into a new, writable tensor that owns its memory.

    ``device``/``dtype``: move/cast the result (``None`` keeps CPU / the wire dtype); the conversion
    is the only copy made. Raises ``ValueError`` when the dtype is unspecified or unknown, a
    dimension is negative, or ``len(data)`` differs from ``product(shape) * itemsize``.
    """
    wire = _checked_dtype(msg)
    shape = tuple(msg.shape)
    numel = _checked_numel(msg)
    data = msg.data  # upb returns a fresh bytes object per access: read it once
    expected = numel * wire.itemsize
    if len(data) != expected:
        raise ValueError(
            f"tensor data has {len(data)} bytes, expected {expected} "
            f"(shape {list(shape)} x {wire.itemsize} bytes per {_proto_dtype_name(msg.dtype)} element)"
        )
    if numel == 0:
        out = torch.empty(shape, dtype=dtype or wire)
        return out if device is None else out.to(device)

    target_device = torch.device(device) if device is not None else torch.device("cpu")
    converts = (dtype is not None and dtype != wire) or target_device.type != "cpu"
    if converts:
        # Read-only view of the immutable bytes, consumed by a conversion that allocates anew.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
            view = torch.frombuffer(data, dtype=torch.uint8)
        return view.view(wire).reshape(shape).to(device=target_device, dtype=dtype or wire)
    # Plain copy into fresh memory (numpy's copy measured faster than bytearray() or clone()).
    buf = np.frombuffer(data, dtype=np.uint8).copy()
    return torch.from_numpy(buf).view(wire).reshape(shape)


def _checked_dtype(msg: common_pb2.Tensor) -> torch.dtype:
    if msg.dtype == common_pb2.DTYPE_UNSPECIFIED:
        raise ValueError("tensor dtype is DTYPE_UNSPECIFIED")
    dtype = _FROM_PROTO.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"tensor dtype has unknown enum value {msg.dtype}")
    return dtype


def _checked_numel(msg: common_pb2.Tensor) -> int:
    shape = list(msg.shape)
    for i, d in enumerate(shape):
        if d < 0:
            raise ValueError(f"tensor shape {shape} has a negative dimension at index {i}")
    return math.prod(shape)


def tensor_from_field(msg: common_pb2.Tensor, field: str, required: bool = True) -> torch.Tensor | None:
    """A request's tensor field decoded, or INVALID_ARGUMENT naming `field` (None when unset
    and not `required`)."""
    if not msg.ByteSize():
        if required:
            raise InvalidArgument(field, "is required")
        return None
    try:
        return tensor_from_proto(msg)
    except ValueError as exc:
        raise InvalidArgument(field, str(exc)) from None
