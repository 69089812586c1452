"""LoRA store: a real service process on loopback over a copy of the tiny zoo's LoRAs.

Deltas streamed over gRPC are checked against Diffusers itself: `load_lora_weights` +
`fuse_lora(lora_scale=scale)` on a fresh pipeline, fused minus pristine weight, must equal the
streamed `up @ down` for exactly the parameters the fuse changed, in the model's parameter order
(`FP32_RTOL`, `FP16_RTOL`); they also equal bit for bit what a worker without a store prepares
locally. Errors map to their statuses and leave the service healthy; the
host tier stays within its byte budget; a restart serves from the disk tier without recomputing.
"""

from __future__ import annotations

import random
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from diffusers import DiffusionPipeline
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.lora_store.store import LoraStore
from swiftd import rpc
from swiftd.errors import InvalidArgument
from swiftd.launcher import start_service
from swiftd.loading import load_pipeline
from swiftd.lora import WeightDelta, delta_from_proto, deltas_to_chunks, extract_deltas, prepare_deltas
from swiftd.v1 import common_pb2, lora_store_pb2, lora_store_pb2_grpc, unet_pb2, unet_pb2_grpc
from tests.model_roots import BOGUS, make_root

BASE = "tiny-sd15"
SD15_LORAS = [
    "tiny-sd15-lora-peft-r4",
    "tiny-sd15-lora-peft-r64",
    "tiny-sd15-lora-kohya-r16-te",
    "tiny-sd15-lora-kohya-r8-conv",
]
SCALES = {
    "tiny-sd15-lora-peft-r4": 1.0,
    "tiny-sd15-lora-peft-r64": 0.5,
    "tiny-sd15-lora-kohya-r16-te": 0.7,
    "tiny-sd15-lora-kohya-r8-conv": 0.0,
}  # 0 = unset = 1.0
CHUNK_BYTES = 32 << 10
F32 = common_pb2.DTYPE_FLOAT32


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(zoo_root, tmp_path_factory):
    return make_root(zoo_root, tmp_path_factory.mktemp("lora_root"))


@pytest.fixture(scope="module")
def store(root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lora_cache")
    service = start_service(
        "lora_store",
        "services.lora_store",
        [
            "--model-root",
            str(root),
            "--cache-dir",
            str(cache),
            "--host-budget-mib",
            "64",
            "--chunk-mib",
            str(CHUNK_BYTES / rpc.MiB),
        ],
        num_threads=1,
    )
    channel = rpc.create_channel(service.address)
    yield service, lora_store_pb2_grpc.LoraStoreStub(channel), cache
    channel.close()
    service.stop()


@pytest.fixture(scope="module")
def reference(root):
    """Deltas prepared in this process, as a worker without a store does: (pipeline, extracted at
    scale 1 per tiny-sd15 LoRA). Only for checking that both paths give the same bits."""
    pipe = load_pipeline(root / "models" / BASE)
    return pipe, {lora_id: extract_deltas(pipe, root / "loras" / f"{lora_id}.safetensors") for lora_id in SD15_LORAS}


# Stated tolerances of streamed deltas against Diffusers' fused weights, per parameter: max abs
# difference <= RTOL * max |fused - pristine| + ATOL_ULPS * ulp(max |pristine weight|) (the
# fused-minus-pristine subtraction itself is only exact to an ulp of the weight).
FP32_RTOL = 1e-5
FP16_RTOL = 2e-3  # both factors rounded to fp16
ATOL_ULPS = 4
LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")


@pytest.fixture(scope="module")
def fused(root):
    """`fused(lora_id, scale, base)`: {parameter name: fused - pristine weight} for every parameter
    Diffusers' `load_lora_weights` + `fuse_lora(lora_scale=scale)` changes, in the order of the
    model's parameters (text encoders, then the UNet), plus the pristine weights, on a pipeline
    loaded by Diffusers itself (no swiftd code)."""
    pipes, cache = {}, {}

    def get(lora_id: str, scale: float = 1.0, base: str = BASE):
        key = (lora_id, float(scale), base)
        if key not in cache:
            if base not in pipes:
                pipes[base] = DiffusionPipeline.from_pretrained(root / "models" / base)
            pipe = pipes[base]
            modules = {c: getattr(pipe, c) for c in LORA_COMPONENTS if getattr(pipe, c, None) is not None}

            def weights():
                return {f"{c}.{n}": p.detach().clone() for c, m in modules.items() for n, p in m.named_parameters()}

            pristine_state = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in modules.items()}
            pristine = weights()
            pipe.load_lora_weights(str(root / "loras" / f"{lora_id}.safetensors"), adapter_name="reference")
            pipe.fuse_lora(lora_scale=scale, adapter_names=["reference"])
            pipe.unload_lora_weights()  # the fused weights stay, the adapter layers go
            after = weights()
            for c, m in modules.items():
                m.load_state_dict(pristine_state[c])
            assert list(after) == list(pristine)
            changed = {n: after[n] - pristine[n] for n in pristine if not torch.equal(after[n], pristine[n])}
            cache[key] = changed, {n: pristine[n] for n in changed}
        return cache[key]

    return get


def product(delta: WeightDelta) -> torch.Tensor:
    """The full matrix a streamed delta stands for, in fp32."""
    return delta.up.float() if delta.down is None else delta.up.float() @ delta.down.float()


def assert_matches_fused(got, expected, rtol=FP32_RTOL):
    """`got` (streamed deltas) against `expected` (`fused(...)`): the same parameters in the same
    order, each up @ down equal to Diffusers' fused-minus-pristine weight within the tolerance."""
    changed, pristine = expected
    assert list(got) == list(changed), "parameters or their order differ from what Diffusers' fuse changes"
    for name, want in changed.items():
        have = product(got[name])
        assert have.numel() == want.numel(), name
        have = have.reshape(want.shape)
        bound = rtol * want.abs().max().item() + ATOL_ULPS * torch.finfo(torch.float32).eps * (
            pristine[name].abs().max().item()
        )
        error = (have - want).abs().max().item()
        assert error <= bound, f"{name}: max abs difference {error:.3g} > {bound:.3g}"


def f32(x: float) -> float:
    """A scale as it travels (LoraRef.scale is a float32)."""
    return torch.tensor(x, dtype=torch.float32).item()


def local_deltas(extracted, scale, dtype=torch.float32):
    """What a worker without a store would apply (its own preparation, scale folded in)."""
    return prepare_deltas(extracted, scale, dtype)


def stream(stub, loras, base=BASE, dtype=F32, request_id="t"):
    request = lora_store_pb2.StreamDeltasRequest(
        loras=[common_pb2.LoraRef(lora_id=i, scale=s) for i, s in loras],
        base_model_id=base,
        dtype=dtype,
        request_id=request_id,
    )
    return list(stub.StreamDeltas(request, timeout=60))


def decode(chunks, chunk_bytes=CHUNK_BYTES):
    """[(lora_id, scale, {name: delta})] in stream order, checking the chunking contract."""
    out = []
    for chunk in chunks:
        if not out or out[-1][3]:
            out.append([chunk.lora_id, chunk.scale, {}, False])
        entry = out[-1]
        assert chunk.lora_id == entry[0] and chunk.scale == entry[1], "LoRAs interleaved"
        size = 0
        for proto in chunk.deltas:
            name, delta = delta_from_proto(proto)
            assert name not in entry[2]
            entry[2][name] = delta
            size += delta.nbytes
        assert size <= chunk_bytes or len(chunk.deltas) == 1, f"chunk of {size} bytes"
        entry[3] = chunk.last
    assert all(done for *_, done in out), "a LoRA without its last chunk"
    return [(lora_id, scale, deltas) for lora_id, scale, deltas, _ in out]


def assert_same(got, want):
    assert list(got) == list(want), "order or names differ"
    for name, delta in want.items():
        assert (got[name].down is None) == (delta.down is None), name
        assert torch.equal(got[name].up, delta.up) and got[name].up.dtype == delta.up.dtype, name
        if delta.down is not None:
            assert torch.equal(got[name].down, delta.down), name


def assert_healthy(service, stub):
    channel = rpc.create_channel(service.address)
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    finally:
        channel.close()
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert stub.ListLoras(lora_store_pb2.LoraStoreListLorasRequest(), timeout=10).loras
    assert service.process.poll() is None
    assert not [line for line in service.log_lines if "incident" in line], "an RPC failed with INTERNAL"


def rpc_error(call, request):
    """The RpcError of a unary call or of a server stream (raised while reading it)."""
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=60)
        if hasattr(result, "__next__"):
            list(result)
    return info.value


_CACHE_LINE = re.compile(
    r"cache (host|disk|precompute) lora=(\S+) base=(\S+) dtype=(\S+) bytes=(\d+) .*"
    r"host_bytes=(\d+) host_budget=(\d+) host_entries=(\d+) precomputes=(\d+) "
    r"disk_hits=(\d+) host_hits=(\d+)"
)


def cache_events(service, count, timeout=10.0):
    """The service's first `count` cache log lines, as dicts (waits for the log pump)."""
    deadline = time.monotonic() + timeout
    while True:
        events = []
        for line in list(service.log_lines):
            m = _CACHE_LINE.search(line)
            if m:
                keys = [
                    "tier",
                    "lora",
                    "base",
                    "dtype",
                    "bytes",
                    "host_bytes",
                    "host_budget",
                    "host_entries",
                    "precomputes",
                    "disk_hits",
                    "host_hits",
                ]
                events.append({k: (int(v) if v.isdigit() else v) for k, v in zip(keys, m.groups())})
        if len(events) >= count or time.monotonic() > deadline:
            assert len(events) >= count, f"expected {count} cache lines:\n{service.log_tail()}"
            return events[:count]
        time.sleep(0.05)


# -- catalog ---------------------------------------------------------------------------------------


def test_catalog_lists_every_file_with_metadata(store, root, fused):
    _, stub, _ = store
    loras = {i.lora_id: i for i in stub.ListLoras(lora_store_pb2.LoraStoreListLorasRequest(), timeout=10).loras}
    files = sorted(p.stem for p in (root / "loras").glob("*.safetensors"))
    assert sorted(loras) == files
    for lora_id in SD15_LORAS:
        info = loras[lora_id]
        assert info.family == "sd15"
        assert info.format == ("peft" if "peft" in lora_id else "kohya")
        assert info.rank == int(re.search(r"-r(\d+)", lora_id).group(1))
        assert info.num_targets == len(fused(lora_id)[0])  # the weights Diffusers' fuse changes
        assert info.size_bytes == (root / "loras" / f"{lora_id}.safetensors").stat().st_size
    for lora_id in loras:
        if lora_id.startswith("tiny-sdxl"):
            assert loras[lora_id].family == "sdxl", lora_id
    sdxl = stub.ListLoras(lora_store_pb2.LoraStoreListLorasRequest(family="sdxl"), timeout=10).loras
    assert sorted(i.lora_id for i in sdxl) == sorted(i for i in files if i.startswith("tiny-sdxl"))


def test_register_stream_and_remove_a_file_added_while_running(store, root, fused):
    service, stub, cache = store
    late = root / "loras" / "late-lora.safetensors"
    shutil.copy(root / "loras" / "tiny-sd15-lora-peft-r4.safetensors", late)
    listed = lambda: [i.lora_id for i in stub.ListLoras(lora_store_pb2.LoraStoreListLorasRequest(), timeout=10).loras]  # noqa: E731
    assert "late-lora" not in listed()
    assert (
        rpc_error(
            stub.StreamDeltas,
            lora_store_pb2.StreamDeltasRequest(loras=[common_pb2.LoraRef(lora_id="late-lora")], base_model_id=BASE),
        ).code()
        == grpc.StatusCode.NOT_FOUND
    )

    first = stub.RegisterLora(lora_store_pb2.RegisterLoraRequest(lora_id="late-lora"), timeout=10)
    assert not first.already_registered and first.lora.format == "peft" and first.lora.family == "sd15"
    again = stub.RegisterLora(lora_store_pb2.RegisterLoraRequest(lora_id="late-lora"), timeout=10)
    assert again.already_registered and again.lora == first.lora
    assert "late-lora" in listed()

    [(lora_id, scale, deltas)] = decode(stream(stub, [("late-lora", 1.0)]))
    assert (lora_id, scale) == ("late-lora", 1.0)
    assert_matches_fused(deltas, fused("tiny-sd15-lora-peft-r4", 1.0))
    assert list(cache.glob("*/*/late-lora.safetensors")), "no disk-tier entry written"

    assert stub.RemoveLora(lora_store_pb2.RemoveLoraRequest(lora_id="late-lora"), timeout=10).removed
    assert not stub.RemoveLora(lora_store_pb2.RemoveLoraRequest(lora_id="late-lora"), timeout=10).removed
    assert "late-lora" not in listed()
    assert late.is_file(), "the source file must stay"
    assert not list(cache.glob("*/*/late-lora.safetensors")), "disk-tier entry left behind"
    error = rpc_error(
        stub.StreamDeltas,
        lora_store_pb2.StreamDeltasRequest(loras=[common_pb2.LoraRef(lora_id="late-lora")], base_model_id=BASE),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and "late-lora" in error.details()


# -- streaming -------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_id", SD15_LORAS)
def test_stream_matches_diffusers_fuse_and_local_preparation(store, fused, reference, lora_id):
    _, stub, _ = store
    _, extracted = reference
    scale = SCALES[lora_id]
    chunks = stream(stub, [(lora_id, scale)], request_id=f"req-{lora_id}")
    assert all(c.request_id == f"req-{lora_id}" for c in chunks)
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    if sum(d.nbytes for d in extracted[lora_id].values()) > 2 * CHUNK_BYTES:
        assert len(chunks) > 1
    [(got_id, got_scale, deltas)] = decode(chunks)
    effective = f32(scale or 1.0)
    assert (got_id, got_scale) == (lora_id, effective)
    assert_matches_fused(deltas, fused(lora_id, effective))
    # A worker without a store prepares them itself, folding the scale into the raw factors; the
    # store folds it into its cached scale-1 entry: the same up to rounding (bit-equal where the
    # delta is factored, or the scale is 1).
    direct = local_deltas(extracted[lora_id], effective)
    assert list(direct) == list(deltas)
    for name, delta in direct.items():
        assert (deltas[name].down is None) == (delta.down is None), name
        if delta.down is not None:
            assert torch.equal(deltas[name].down, delta.down), name
        if delta.down is not None or effective == 1.0:
            assert torch.equal(deltas[name].up, delta.up), name
        torch.testing.assert_close(deltas[name].up, delta.up, rtol=1e-6, atol=1e-7)


def test_stream_of_a_lora_set_keeps_order_and_dtype(store, fused):
    _, stub, _ = store
    loras = [
        ("tiny-sd15-lora-kohya-r16-te", 0.8),
        ("tiny-sd15-lora-peft-r64", 1.0),
        ("tiny-sd15-lora-kohya-r8-conv", -0.5),
    ]
    got = decode(stream(stub, loras, dtype=common_pb2.DTYPE_FLOAT16))
    assert [(i, s) for i, s, _ in got] == [(i, pytest.approx(s)) for i, s in loras]
    for (lora_id, scale), (_, _, deltas) in zip(loras, got):
        assert all(t.dtype == torch.float16 for d in deltas.values() for t in (d.up, d.down) if t is not None)
        assert_matches_fused(deltas, fused(lora_id, scale), rtol=FP16_RTOL)
    names = list(got[0][2])
    assert names[0].startswith("text_encoder.") and names[-1].startswith("unet."), "text encoder first"


def test_stream_sdxl_with_both_text_encoders(store, fused):
    _, stub, _ = store
    loras = [("tiny-sdxl-lora-kohya-r16-te", 0.5), ("tiny-sdxl-lora-peft-r4", 1.0)]
    got = decode(stream(stub, loras, base="tiny-sdxl"))
    for (lora_id, scale), (got_id, _, deltas) in zip(loras, got):
        assert got_id == lora_id
        assert_matches_fused(deltas, fused(lora_id, scale, "tiny-sdxl"))
    assert any(n.startswith("text_encoder_2.") for n in got[0][2])


@pytest.mark.parametrize(
    "base, lora_id", [("tiny-sd15", "tiny-sd15-lora-kohya-r16-te"), ("tiny-sdxl", "tiny-sdxl-lora-kohya-r16-te")]
)
def test_chunks_keep_the_order_contract(store, base, lora_id):
    """protos/swiftd/v1/lora_store.proto: within a LoRA every text-encoder delta precedes every UNet
    delta, and the first UNet delta arrives before the last chunk (the worker starts text encoding
    then), whatever order the prepared deltas were held in."""
    _, stub, _ = store
    chunks = stream(stub, [(lora_id, 1.0)], base=base)
    names = [d.parameter_name for c in chunks for d in c.deltas]
    components = [n.split(".", 1)[0] for n in names]
    assert "unet" in components and components[0].startswith("text_encoder")
    assert components == sorted(components, key=("text_encoder", "text_encoder_2", "unet").index)
    first_unet_chunk = next(
        i for i, c in enumerate(chunks) if any(d.parameter_name.startswith("unet.") for d in c.deltas)
    )
    assert first_unet_chunk < len(chunks) - 1 and chunks[-1].last and not any(c.last for c in chunks[:-1])
    # The order holds even for deltas held UNet first.
    held = {d.parameter_name: delta_from_proto(d)[1] for c in chunks for d in c.deltas}
    unet_first = dict(sorted(held.items(), key=lambda item: not item[0].startswith("unet.")))
    assert next(iter(unet_first)).startswith("unet.")
    rechunked = [d.parameter_name for c in deltas_to_chunks(lora_id, 1.0, unet_first) for d in c.deltas]
    assert rechunked == names


def test_fused_tolerance_rejects_wrong_deltas(store, fused):
    """Negative controls for `assert_matches_fused`: each wrong variant of a correct stream fails."""
    _, stub, _ = store
    lora_id = "tiny-sd15-lora-kohya-r16-te"
    [(_, _, deltas)] = decode(stream(stub, [(lora_id, 0.7)]))
    [(_, _, half)] = decode(stream(stub, [(lora_id, 0.7)], dtype=common_pb2.DTYPE_FLOAT16))
    assert_matches_fused(deltas, fused(lora_id, 0.7))
    assert_matches_fused(half, fused(lora_id, 0.7), rtol=FP16_RTOL)
    a, b = next(
        (a, b) for a in deltas for b in deltas if a < b and product(deltas[a]).shape == product(deltas[b]).shape
    )
    swapped = {**deltas, a: deltas[b], b: deltas[a]}
    wrong = {
        "scale 1 % off": (deltas, fused(lora_id, 0.707), FP32_RTOL),
        "scale not folded in": (deltas, fused(lora_id, 1.0), FP32_RTOL),
        "fp16 factors at the fp32 tolerance": (half, fused(lora_id, 0.7), FP32_RTOL),
        "fp16, scale 1 % off": (half, fused(lora_id, 0.707), FP16_RTOL),
        "a parameter dropped": (dict(list(deltas.items())[:-1]), fused(lora_id, 0.7), FP32_RTOL),
        "out of order": (dict(reversed(deltas.items())), fused(lora_id, 0.7), FP32_RTOL),
        "two layers' deltas swapped": (swapped, fused(lora_id, 0.7), FP32_RTOL),
    }
    for case, (got, expected, rtol) in wrong.items():
        with pytest.raises(AssertionError):
            assert_matches_fused(got, expected, rtol)
            pytest.fail(f"negative control passed: {case}")


# -- errors ----------------------------------------------------------------------------------------


def test_bad_requests_change_nothing(store, root):
    service, stub, _ = store
    before = stub.ListLoras(lora_store_pb2.LoraStoreListLorasRequest(), timeout=10)
    for bad in ["../loras/tiny-sd15-lora-peft-r4", "loras/x", "..", "/etc/passwd", ""]:
        error = rpc_error(stub.RegisterLora, lora_store_pb2.RegisterLoraRequest(lora_id=bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, error.details())
        assert "lora_id" in error.details()
        error = rpc_error(
            stub.StreamDeltas,
            lora_store_pb2.StreamDeltasRequest(loras=[common_pb2.LoraRef(lora_id=bad)], base_model_id=BASE),
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, error.details())
    assert (
        rpc_error(stub.RemoveLora, lora_store_pb2.RemoveLoraRequest(lora_id="a/../b")).code()
        == grpc.StatusCode.INVALID_ARGUMENT
    )

    error = rpc_error(stub.RegisterLora, lora_store_pb2.RegisterLoraRequest(lora_id="no-such-lora"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "no-such-lora" in error.details()
    junk = root / "loras" / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    try:
        error = rpc_error(stub.RegisterLora, lora_store_pb2.RegisterLoraRequest(lora_id="junk"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "junk" in error.details()
    finally:
        junk.unlink()

    def request(**fields):
        defaults = {"loras": [common_pb2.LoraRef(lora_id="tiny-sd15-lora-peft-r4")], "base_model_id": BASE}
        return lora_store_pb2.StreamDeltasRequest(**{**defaults, **fields})

    cases = {
        "unknown lora": (
            request(
                loras=[common_pb2.LoraRef(lora_id="tiny-sd15-lora-peft-r4"), common_pb2.LoraRef(lora_id="no-such-lora")]
            ),
            grpc.StatusCode.NOT_FOUND,
            "no-such-lora",
        ),
        "unknown base": (request(base_model_id="no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        "no base": (request(base_model_id=""), grpc.StatusCode.INVALID_ARGUMENT, "base_model_id"),
        "no loras": (request(loras=[]), grpc.StatusCode.INVALID_ARGUMENT, "loras"),
        "int dtype": (request(dtype=common_pb2.DTYPE_INT64), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
        "unknown dtype": (request(dtype=42), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
        "nan scale": (
            request(loras=[common_pb2.LoraRef(lora_id="tiny-sd15-lora-peft-r4", scale=float("nan"))]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "scale",
        ),
        "sdxl lora on sd15": (
            request(loras=[common_pb2.LoraRef(lora_id="tiny-sdxl-lora-peft-r4")]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "tiny-sdxl-lora-peft-r4",
        ),
        "unknown target key": (
            request(loras=[common_pb2.LoraRef(lora_id=BOGUS)]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "lora_unet_nonexistent_layer",
        ),
    }
    for name, (req, code, needle) in cases.items():
        error = rpc_error(stub.StreamDeltas, req)
        assert error.code() == code, (name, error.code(), error.details())
        assert needle in error.details(), (name, error.details())
    error = rpc_error(stub.PrefetchLora, lora_store_pb2.PrefetchLoraRequest(lora_id=BOGUS, base_model_id=BASE))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "nonexistent" in error.details()
    error = rpc_error(stub.ListLoras, lora_store_pb2.LoraStoreListLorasRequest(family="sd3"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "family" in error.details()

    assert stub.ListLoras(lora_store_pb2.LoraStoreListLorasRequest(), timeout=10) == before
    assert_healthy(service, stub)
    assert decode(stream(stub, [("tiny-sd15-lora-peft-r4", 1.0)]))


# -- push to a UNet worker -------------------------------------------------------------------------


class Receiver(unet_pb2_grpc.UNetWorkerServicer):
    """A stand-in UNet worker that keeps what ReceiveLoraDeltas brings."""

    def __init__(self):
        self.streams = []

    def ReceiveLoraDeltas(self, request_iterator, context):
        chunks = list(request_iterator)
        self.streams.append(chunks)
        return unet_pb2.ReceiveLoraDeltasResponse(
            lora_ids=[c.lora_id for c in chunks if c.last],
            parameters_received=sum(len(c.deltas) for c in chunks),
            bytes_received=sum(
                len(t.data)
                for c in chunks
                for d in c.deltas
                for t in ([d.full] if d.HasField("full") else [d.factored.up, d.factored.down])
            ),
        )


@pytest.fixture(scope="module")
def receiver():
    servicer = Receiver()
    server = rpc.create_server(4)
    unet_pb2_grpc.add_UNetWorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_push_to_a_worker(store, fused, receiver):
    _, stub, _ = store
    servicer, address = receiver
    loras = [("tiny-sd15-lora-kohya-r8-conv", 1.0), ("tiny-sd15-lora-peft-r4", 0.25)]
    stub.PrefetchLora(lora_store_pb2.PrefetchLoraRequest(lora_id=loras[0][0], base_model_id=BASE), timeout=60)
    response = stub.PushLoras(
        lora_store_pb2.PushLorasRequest(
            loras=[common_pb2.LoraRef(lora_id=i, scale=s) for i, s in loras],
            base_model_id=BASE,
            dtype=F32,
            unet_worker_address=address,
            request_id="push-1",
        ),
        timeout=60,
    )
    got = decode(servicer.streams[-1])
    assert [(i, s) for i, s, _ in got] == loras
    for (lora_id, scale), (_, _, deltas) in zip(loras, got):
        assert_matches_fused(deltas, fused(lora_id, scale))
    assert all(c.request_id == "push-1" for c in servicer.streams[-1])
    assert response.parameters_sent == sum(len(d) for *_, d in got)
    assert response.bytes_sent == sum(x.nbytes for *_, d in got for x in d.values())
    assert loras[0][0] in response.cache_hits and response.seconds > 0


def test_push_to_an_unreachable_worker(store):
    service, stub, _ = store
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there
    error = rpc_error(
        stub.PushLoras,
        lora_store_pb2.PushLorasRequest(
            loras=[common_pb2.LoraRef(lora_id="tiny-sd15-lora-peft-r4")],
            base_model_id=BASE,
            unet_worker_address=address,
        ),
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE and address in error.details()
    error = rpc_error(
        stub.PushLoras,
        lora_store_pb2.PushLorasRequest(
            loras=[common_pb2.LoraRef(lora_id="tiny-sd15-lora-peft-r4")],
            base_model_id=BASE,
            unet_worker_address="nowhere",
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unet_worker_address" in error.details()
    assert_healthy(service, stub)


# -- tiers -----------------------------------------------------------------------------------------


def test_host_budget_and_restart_from_disk(root, fused, tmp_path):
    """Budget fits the rank-64 LoRA (2.06 MB prepared) but not it and another; then a restart."""
    budget_mib = 2.5
    args = ["--model-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--host-budget-mib", str(budget_mib)]
    prefetch = lambda stub, lora_id: stub.PrefetchLora(  # noqa: E731
        lora_store_pb2.PrefetchLoraRequest(lora_id=lora_id, base_model_id=BASE), timeout=60
    )
    big, small = "tiny-sd15-lora-peft-r64", "tiny-sd15-lora-kohya-r16-te"

    service = start_service("lora_store", "services.lora_store", args, num_threads=1)
    try:
        stub = lora_store_pb2_grpc.LoraStoreStub(rpc.create_channel(service.address))
        first = prefetch(stub, big)
        assert not first.already_hot and first.size_bytes < budget_mib * rpc.MiB < 2 * first.size_bytes
        assert prefetch(stub, big).already_hot
        assert not prefetch(stub, small).already_hot  # evicts the rank-64 one
        assert not prefetch(stub, big).already_hot  # back from disk, evicting the small one
        events = cache_events(service, 4)
    finally:
        service.stop()
    assert [e["tier"] for e in events] == ["precompute", "host", "precompute", "disk"]
    for e in events:
        assert e["host_bytes"] <= e["host_budget"] == int(budget_mib * rpc.MiB)
        assert e["host_entries"] == 1

    service = start_service("lora_store", "services.lora_store", args, num_threads=1)
    try:
        stub = lora_store_pb2_grpc.LoraStoreStub(rpc.create_channel(service.address))
        assert not prefetch(stub, small).already_hot
        [(_, _, deltas)] = decode(stream(stub, [(big, 1.0)]), rpc.LORA_CHUNK_BYTES)
        assert_matches_fused(deltas, fused(big, 1.0))
        events = cache_events(service, 2)
    finally:
        service.stop()
    assert [e["tier"] for e in events] == ["disk", "disk"]
    assert events[-1]["precomputes"] == 0 and events[-1]["disk_hits"] == 2


def test_store_tiers_in_process(root, tmp_path):
    """Random prefetches never exceed the budget; one computation per entry under concurrency; an
    oversized LoRA is served from disk without being kept; a changed source is recomputed."""
    budget = 2_500_000
    store = LoraStore(root, tmp_path / "cache", budget)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: store.entry("tiny-sd15-lora-peft-r64", BASE)[1], range(4)))
    assert results.count("precompute") == 1 and store.stats()["precomputes"] == 1
    rng = random.Random(0)
    keys = {("tiny-sd15-lora-peft-r64", torch.float32)}
    for _ in range(16):
        key = (rng.choice(SD15_LORAS), rng.choice([torch.float32, torch.float16]))
        keys.add(key)
        store.entry(key[0], BASE, key[1])
        assert store.host.nbytes <= budget
    stats = store.stats()
    assert stats["precomputes"] == len(keys), "each entry is computed once, then read from disk"
    assert stats["host_evictions"] > 0 and stats["disk_hits"] > 0

    small = LoraStore(root, tmp_path / "cache", 100_000)
    prepared, tier, _ = small.entry("tiny-sd15-lora-peft-r64", BASE)
    assert tier == "disk" and len(small.host) == 0
    assert small.entry("tiny-sd15-lora-peft-r64", BASE)[1] == "disk"

    # Replace a LoRA's file under the same id: the disk entry is stale and recomputed.
    shutil.copy(root / "loras" / "tiny-sd15-lora-peft-r4.safetensors", root / "loras" / "swap.safetensors")
    store.register("swap")
    before = store.entry("swap", BASE)[0].deltas
    time.sleep(0.01)
    shutil.copy(root / "loras" / "tiny-sd15-lora-kohya-r8-conv.safetensors", root / "loras" / "swap.safetensors")
    after, tier, _ = store.entry("swap", BASE)
    assert tier == "precompute" and list(after.deltas) != list(before)
    assert store.catalog.get("swap").format == "kohya"
    store.remove("swap")
    (root / "loras" / "swap.safetensors").unlink()

    # A link that leaves the root is refused like a path.
    outside = tmp_path / "outside.safetensors"
    shutil.copy(root / "loras" / "tiny-sd15-lora-peft-r4.safetensors", outside)
    (root / "loras" / "escape.safetensors").symlink_to(outside)
    try:
        with pytest.raises(InvalidArgument, match="outside"):
            store.register("escape")
    finally:
        (root / "loras" / "escape.safetensors").unlink()


def test_concurrent_streams(store, fused):
    """Several clients at once each get a complete, correct stream of every LoRA asked for, and
    the same bits."""
    _, stub, _ = store
    loras = [("tiny-sd15-lora-peft-r64", 1.0), ("tiny-sd15-lora-kohya-r16-te", 0.6)]
    start = threading.Barrier(4)

    def run(i):
        start.wait(timeout=30)  # all four streams in flight together
        return decode(stream(stub, loras, request_id=f"concurrent-{i}"))

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))  # a failed stream raises here
    assert len(results) == 4
    for got in results:
        assert [(i, s) for i, s, _ in got] == [(i, f32(s)) for i, s in loras], "a LoRA missing or out of order"
        for (lora_id, scale), (_, _, deltas) in zip(loras, got):
            assert deltas, f"{lora_id}: empty stream"
            assert_matches_fused(deltas, fused(lora_id, scale))
        for (_, _, deltas), (_, _, first) in zip(got, results[0]):
            assert_same(deltas, first)


def test_base_pipelines_in_memory_are_bounded(root):
    """Naming every base model of a large repository does not load them all at once: the store keeps
    the --max-base-models most recently used and loads an evicted one again when it is named."""
    from services.lora_store.store import BaseModels

    loads = []

    def loader(path):
        loads.append(path.name)
        return load_pipeline(path)

    bases = BaseModels(root, loader, max_loaded=1)
    first = bases.pipeline(BASE)
    assert bases.pipeline(BASE) is first and loads == [BASE]  # kept while it is the one in use
    bases.pipeline("tiny-sdxl")
    assert bases.pipeline(BASE) is not first and loads == [BASE, "tiny-sdxl", BASE]


def test_a_corrupt_disk_entry_is_detected_and_recomputed(root, fused, tmp_path):
    """A bit flipped in a disk entry's tensor data (the safetensors header still parses) is caught
    by its content checksum: the entry is recomputed and rewritten, and the deltas served are right."""
    lora = "tiny-sd15-lora-peft-r4"
    assert LoraStore(root, tmp_path / "cache", 0).entry(lora, BASE)[1] == "precompute"
    (path,) = (tmp_path / "cache").glob(f"*/*/{lora}.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor
    path.write_bytes(bytes(data))

    restarted = LoraStore(root, tmp_path / "cache", 0)  # a restart: only the disk tier is left
    prepared, tier, _ = restarted.entry(lora, BASE)
    assert tier == "precompute"
    assert_matches_fused(prepared.deltas, fused(lora, 1.0))
    assert LoraStore(root, tmp_path / "cache", 0).entry(lora, BASE)[1] == "disk"  # rewritten whole


# -- durability and replicas -------------------------------------------------------------------------


def test_two_replicas_share_one_catalog_that_survives_restarts(zoo_root, fused, tmp_path):
    """Two store processes naming one --registry and one --cache-dir serve one catalog: what one
    registers or removes the other lists (or refuses) at its next call, an entry one prepared the
    other reads from disk, and a restart keeps the registrations, not whatever lies in loras/."""
    root = make_root(zoo_root, tmp_path / "root")
    registry = tmp_path / "state" / "registry.json"
    args = ["--model-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--registry", str(registry)]
    files = sorted(p.stem for p in (root / "loras").glob("*.safetensors"))
    late, removed = "late-lora", "tiny-sd15-lora-peft-r4"

    def listed(stub) -> list[str]:
        return [i.lora_id for i in stub.ListLoras(lora_store_pb2.LoraStoreListLorasRequest(), timeout=10).loras]

    def register(stub, lora_id):
        return stub.RegisterLora(lora_store_pb2.RegisterLoraRequest(lora_id=lora_id), timeout=10)

    a = start_service("lora_store", "services.lora_store", args, num_threads=1)
    b = start_service("lora_store", "services.lora_store", args, num_threads=1)
    try:
        stub_a, stub_b = (lora_store_pb2_grpc.LoraStoreStub(rpc.create_channel(s.address)) for s in (a, b))
        assert listed(stub_a) == listed(stub_b) == files  # the first start registered the folder
        shutil.copy(root / "loras" / f"{removed}.safetensors", root / "loras" / f"{late}.safetensors")
        assert late not in listed(stub_b)  # a file copied in is not served until registered

        assert not register(stub_a, late).already_registered
        assert late in listed(stub_b) and register(stub_b, late).already_registered
        [(_, _, deltas)] = decode(stream(stub_b, [(late, 1.0)]), rpc.LORA_CHUNK_BYTES)  # B prepares it ...
        assert_matches_fused(deltas, fused(removed, 1.0))
        stub_a.PrefetchLora(lora_store_pb2.PrefetchLoraRequest(lora_id=late, base_model_id=BASE), timeout=60)
        assert cache_events(a, 1)[0]["tier"] == "disk"  # ... and A reads what B wrote

        stream(stub_a, [(removed, 1.0)])  # held in A's host tier: B's removal must still reach it
        assert stub_b.RemoveLora(lora_store_pb2.RemoveLoraRequest(lora_id=removed), timeout=10).removed
        assert removed not in listed(stub_a)
        error = rpc_error(
            stub_a.StreamDeltas,
            lora_store_pb2.StreamDeltasRequest(loras=[common_pb2.LoraRef(lora_id=removed)], base_model_id=BASE),
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND and removed in error.details()

        a.stop()
        a = start_service("lora_store", "services.lora_store", args, num_threads=1)
        stub_a = lora_store_pb2_grpc.LoraStoreStub(rpc.create_channel(a.address))
        expected = sorted({*files, late} - {removed})
        assert listed(stub_a) == listed(stub_b) == expected
        assert not register(stub_a, removed).already_registered and removed in listed(stub_b)
    finally:
        a.stop()
        b.stop()


def test_concurrent_registry_changes_from_several_processes_are_all_kept(tmp_path):
    """Read-modify-write under the registry's lock: 3 processes adding 40 ids each at once lose none."""
    import subprocess
    import sys

    from services.lora_store.registry import RegistryFile

    path = tmp_path / "registry.json"
    RegistryFile(path).initialize(lambda: ["seed"])
    script = (
        "import sys\nfrom services.lora_store.registry import RegistryFile\n"
        "r = RegistryFile(sys.argv[1])\n"
        "for i in range(40):\n    r.update(lambda ids: ids.add(f'{sys.argv[2]}-{i}'))\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, str(path), f"w{w}"]) for w in range(3)]
    assert [w.wait(timeout=60) for w in writers] == [0, 0, 0]
    ids, _ = RegistryFile(path).read()
    assert ids == {"seed"} | {f"w{w}-{i}" for w in range(3) for i in range(40)}
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"


def test_disk_tier_removes_only_old_abandoned_writes(tmp_path):
    """A write a killed process left is removed at start; a recent one may be another replica's."""
    import os

    from services.lora_store.tiers import DiskTier

    folder = tmp_path / "cache" / BASE / "float32"
    folder.mkdir(parents=True)
    old, recent = folder / ".a.safetensors.x.tmp", folder / ".b.safetensors.y.tmp"
    for path in (old, recent):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    DiskTier(tmp_path / "cache")
    assert not old.exists() and recent.exists()
