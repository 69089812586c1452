"""The tensor wire codec: bit-exact round trips, wire-dtype conversion, validation."""

import math
import warnings

import numpy as np
import pytest
import torch

from swiftd import codec
from swiftd.v1 import common_pb2

# Integer dtype of the same width, to compare float tensors bit by bit.
_BITS = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.int64: torch.int64,
    torch.uint8: torch.uint8,
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def _roundtrip(t: torch.Tensor, **kw) -> torch.Tensor:
    msg = codec.tensor_to_proto(t, **kw)
    # Through serialized bytes, as on the wire.
    return codec.tensor_from_proto(common_pb2.Tensor.FromString(msg.SerializeToString()))


def _assert_bit_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(_bits(a), _bits(b))


def _special_values(dtype: torch.dtype) -> torch.Tensor:
    """Random values plus NaNs with payloads, +-inf, +-0, subnormals and extremes."""
    g = torch.Generator().manual_seed(0)
    rnd = (torch.randn(1000, generator=g) * 100).to(dtype)
    specials = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0], dtype=dtype)
    info = torch.finfo(dtype)
    extremes = torch.tensor([info.max, info.min, info.tiny, info.smallest_normal], dtype=dtype)
    bits = _BITS[dtype]
    width = torch.iinfo(bits).bits
    if width == 32:  # quiet NaN with payload, signalling-style NaN, smallest subnormal
        raw = [0x7FC12345, 0x7F812345, 0x00000001, -0x7FFFFFFF]
    else:  # 16-bit: NaN payloads and subnormals for fp16/bf16 alike
        raw = [0x7E01, 0x7D01, 0x0001, -0x7FFF]
    nan_bits = torch.tensor(raw, dtype=bits).view(dtype)
    return torch.cat([rnd, specials, extremes, nan_bits])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_roundtrip_bit_exact_with_special_values(dtype):
    t = _special_values(dtype).reshape(2, -1)
    out = _roundtrip(t)
    _assert_bit_exact(t, out)
    # Negative zero survives (not merely compares equal to +0).
    assert torch.signbit(out[torch.isfinite(out) & (out == 0)]).any()


def test_int64_roundtrip():
    t = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 123456789012345], dtype=torch.int64)
    _assert_bit_exact(t, _roundtrip(t))


def test_uint8_roundtrip():
    t = torch.arange(256, dtype=torch.uint8).reshape(4, 8, 8)
    _assert_bit_exact(t, _roundtrip(t))


def test_encoding_is_raw_little_endian_bytes():
    t = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float32)
    msg = codec.tensor_to_proto(t)
    assert msg.dtype == common_pb2.DTYPE_FLOAT32
    assert list(msg.shape) == [1, 3]
    assert msg.data == np.array([1.0, -2.0, 0.5], dtype="<f4").tobytes()
    bf = codec.tensor_to_proto(torch.tensor([1.0], dtype=torch.bfloat16))
    assert bf.dtype == common_pb2.DTYPE_BFLOAT16 and bf.data == b"\x80\x3f"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_non_contiguous_inputs(dtype):
    base = (torch.randn(4, 6, 8) * 50).to(dtype)
    for view in (base.transpose(0, 2), base[:, ::2, 1:], base.expand(3, 4, 6, 8), base.permute(2, 0, 1)[1:]):
        assert not view.is_contiguous()
        out = _roundtrip(view)
        _assert_bit_exact(view.contiguous(), out)
        assert out.is_contiguous()


def test_requires_grad_input():
    t = torch.randn(3, 3, requires_grad=True)
    _assert_bit_exact(t.detach(), _roundtrip(t))


def test_zero_dim_tensor():
    t = torch.tensor(-0.0)
    msg = codec.tensor_to_proto(t)
    assert list(msg.shape) == [] and len(msg.data) == 4
    out = _roundtrip(t)
    assert out.shape == torch.Size([]) and out.dim() == 0
    _assert_bit_exact(t, out)
    i = torch.tensor(7, dtype=torch.int64)
    assert _roundtrip(i).item() == 7 and _roundtrip(i).shape == torch.Size([])


@pytest.mark.parametrize("shape", [(0,), (2, 0, 3), (0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_empty_tensor(shape, dtype):
    t = torch.empty(shape, dtype=dtype)
    msg = codec.tensor_to_proto(t)
    assert msg.data == b""
    out = _roundtrip(t)
    assert out.shape == t.shape and out.dtype == dtype


def test_wire_dtype_fp32_to_fp16():
    t = torch.randn(2, 4, 8, 8) * 10
    msg = codec.tensor_to_proto(t, wire_dtype=torch.float16)
    assert msg.dtype == common_pb2.DTYPE_FLOAT16
    assert len(msg.data) == t.numel() * 2
    out = codec.tensor_from_proto(msg)
    assert out.dtype == torch.float16
    _assert_bit_exact(t.to(torch.float16), out)
    # Decoding straight to the compute dtype.
    back = codec.tensor_from_proto(msg, dtype=torch.float32)
    assert back.dtype == torch.float32
    assert torch.equal(back, t.to(torch.float16).float())
    # Error is within fp16 precision; overflow becomes inf as torch's cast does.
    assert torch.allclose(back, t, rtol=1e-3, atol=1e-3)
    big = codec.tensor_from_proto(codec.tensor_to_proto(torch.tensor([1e6, -1e6]), torch.float16))
    assert torch.isinf(big).all()


def test_wire_dtype_accepts_proto_enum_and_unspecified():
    t = torch.randn(5)
    assert codec.tensor_to_proto(t, common_pb2.DTYPE_BFLOAT16).dtype == common_pb2.DTYPE_BFLOAT16
    assert codec.tensor_to_proto(t, common_pb2.DTYPE_UNSPECIFIED).dtype == common_pb2.DTYPE_FLOAT32
    assert codec.tensor_to_proto(t, torch.float32).dtype == common_pb2.DTYPE_FLOAT32


def test_decode_result_is_writable_and_independent():
    t = torch.arange(16, dtype=torch.float32)
    msg = codec.tensor_to_proto(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable buffer" warning leaks out
        a = codec.tensor_from_proto(msg)
        b = codec.tensor_from_proto(msg)
        c = codec.tensor_from_proto(msg, dtype=torch.float64)
    a.add_(1)
    c.mul_(2)
    assert torch.equal(b, t)
    assert torch.equal(codec.tensor_from_proto(msg), t)


def test_decode_device_argument():
    msg = codec.tensor_to_proto(torch.ones(2, 2))
    out = codec.tensor_from_proto(msg, device="cpu")
    assert out.device.type == "cpu" and torch.equal(out, torch.ones(2, 2))


def test_dtype_helpers():
    for dt in codec.SUPPORTED_DTYPES:
        assert codec.dtype_from_proto(codec.dtype_to_proto(dt)) is dt
    assert codec.dtype_from_proto(common_pb2.DTYPE_UNSPECIFIED, allow_unspecified=True) is None
    with pytest.raises(ValueError, match="UNSPECIFIED"):
        codec.dtype_from_proto(common_pb2.DTYPE_UNSPECIFIED)
    with pytest.raises(ValueError, match="unknown dtype enum value 99"):
        codec.dtype_from_proto(99)
    with pytest.raises(ValueError, match="torch.int32"):
        codec.dtype_to_proto(torch.int32)


def test_unsupported_inputs_rejected():
    with pytest.raises(ValueError, match="cannot be sent"):
        codec.tensor_to_proto(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="cannot be sent"):
        codec.tensor_to_proto(torch.zeros(3), wire_dtype=torch.float64)
    with pytest.raises(ValueError, match="dense"):
        codec.tensor_to_proto(torch.eye(3).to_sparse())
    with pytest.raises(TypeError):
        codec.tensor_to_proto(np.zeros(3))


@pytest.mark.parametrize(
    "msg, match",
    [
        (common_pb2.Tensor(shape=[2], data=b"\0" * 8), "DTYPE_UNSPECIFIED"),
        (common_pb2.Tensor(dtype=42, shape=[2], data=b"\0" * 8), "unknown enum value 42"),
        (
            common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20),
            r"20 bytes, expected 24 \(shape \[2, 3\] x 4 bytes per DTYPE_FLOAT32",
        ),
        (common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT16, shape=[4], data=b"\0" * 10), "10 bytes, expected 8"),
        (common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[], data=b""), "0 bytes, expected 8"),
        (common_pb2.Tensor(dtype=common_pb2.DTYPE_UINT8, shape=[0], data=b"x"), "1 bytes, expected 0"),
        (
            common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[-1, 4], data=b"\0" * 16),
            "negative dimension at index 0",
        ),
        (common_pb2.Tensor(dtype=common_pb2.DTYPE_BFLOAT16, shape=[1 << 40], data=b"\0" * 2), "expected 2199023255552"),
    ],
)
def test_malformed_messages_raise_value_error(msg, match):
    with pytest.raises(ValueError, match=match):
        codec.tensor_from_proto(msg)
    with pytest.raises(ValueError):
        codec.tensor_from_proto(msg, dtype=torch.float32)


def test_tensor_nbytes():
    msg = codec.tensor_to_proto(torch.zeros(3, 5, dtype=torch.float16))
    assert codec.tensor_nbytes(msg) == 30 == len(msg.data)
