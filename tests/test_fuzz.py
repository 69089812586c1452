"""The public API under generated hostile input (hypothesis), against real processes: a gateway,
a UNet worker and the LoRA store on loopback. Every GenerateRequest, however malformed, gets an
image or a clean status naming what is wrong (never INTERNAL, UNKNOWN or UNAVAILABLE, never a
status message longer than a few hundred characters); bytes that are not a message get
INVALID_ARGUMENT; and the suite serves afterwards. Derandomized: the same cases on every run."""

from __future__ import annotations

import io

import grpc
import PIL.Image
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from swiftd import rpc
from swiftd.images import edge_image, encode_png
from swiftd.launcher import start_gateway, start_lora_store, start_unet
from swiftd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MODEL = "tiny-sd15"
CN = f"{MODEL}-cn-edges"
LORA = f"{MODEL}-lora-peft-r4"
# A caller's mistake or a refusal under load; anything else is the server's fault.
CLEAN = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
FUZZ = settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def gateway(zoo_root, tmp_path_factory):
    store = start_lora_store(zoo_root, tmp_path_factory.mktemp("fuzz-cache"), [MODEL], num_threads=1)
    unet = start_unet(zoo_root, MODEL, lora_store=store.address, num_threads=1, wait=False)
    unet.wait_ready()
    gateway = start_gateway([unet.address], lora_store=store.address)
    channel = rpc.create_channel(gateway.address)
    yield gateway_pb2_grpc.GatewayStub(channel), channel, [gateway, unet, store]
    channel.close()
    for service in (gateway, unet, store):
        service.stop()
        assert service.process.returncode == 0, service.log_tail()


INT32 = st.sampled_from([0, 1, -1, 2, 7, 8, 63, 64, 72, 128, 151, 2049, 2**31 - 1, -(2**31)])
FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, 7.5, 30.0, 31.0, -1.0]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
TEXT = st.one_of(
    st.sampled_from(["", "a cat", "a" * 4096, "a" * 4097, "\x00", "ü" * 3000, "../../etc/passwd"]),
    st.text(max_size=64),
)
IDS = st.one_of(
    st.sampled_from([MODEL, CN, LORA, "", "x", "../x", ".hidden", "a" * 128, "a" * 129, "tiny-sdxl", "m" * 5000]),
    st.text(max_size=40),
)
IMAGES = st.sampled_from(
    [
        edge_image(64),
        edge_image(64, 128),
        encode_png(PIL.Image.new("L", (12000, 12000))),
        encode_png(PIL.Image.new("L", (8, 8))),
        b"",
        b"\x89PNG\r\n\x1a\n garbage",
        b"GIF89a",
    ]
)
# Steps and sizes stay small where they are valid, so that the requests that run are cheap.
STEPS = st.sampled_from([0, 1, 2, -1, 151, 2**31 - 1])
SIZES = st.sampled_from([0, 64, 72, 63, -64, 8, 4096, 2**31 - 1])


SD15_LORAS = [f"{MODEL}-lora-{kind}" for kind in ("peft-r4", "peft-r64", "kohya-r16-te", "kohya-r8-conv")]
VALID = {
    "prompt": st.sampled_from(["a cat", "", "a red square on a blue circle"]),
    "size": st.sampled_from([0, 64]),
    "steps": st.sampled_from([1, 2]),
    "float": st.sampled_from([0.0, 1.0, 7.5]),
    "scale": st.sampled_from([0.5, 1.0]),
    "scheduler": st.integers(0, 5),
    "model": st.just(MODEL),
    "lora": st.sampled_from(SD15_LORAS),
    "controlnet": st.sampled_from([CN, f"{MODEL}-cn-depth"]),
    "image": st.just(edge_image(64)),
    "request_id": st.sampled_from(["", "fuzz-1"]),
    "small": st.sampled_from([0, 1]),
    "wire": st.sampled_from([0, common_pb2.DTYPE_FLOAT16, common_pb2.DTYPE_FLOAT32]),
    "count": st.integers(0, 2),
}
HOSTILE = {
    "prompt": TEXT,
    "size": SIZES,
    "steps": STEPS,
    "float": FLOATS,
    "scale": FLOATS,
    "scheduler": st.integers(-3, 20),  # past the enum's values too (proto3 keeps unknown ones)
    "model": IDS,
    "lora": IDS,
    "controlnet": IDS,
    "image": IMAGES,
    "request_id": TEXT,
    "small": INT32,
    "wire": st.integers(-2, 10),
    "count": st.integers(0, 10),
}


@st.composite
def generate_requests(draw) -> gateway_pb2.GenerateRequest:
    """Half the cases hostile in every field, half valid but for one kind of field: these reach
    the planner, the workers and the store."""
    broken = set(HOSTILE) if draw(st.booleans()) else {draw(st.sampled_from(sorted(HOSTILE)))}

    def pick(kind: str):
        return draw(HOSTILE[kind] if kind in broken else VALID[kind])

    params = common_pb2.GenerationParams(
        prompt=pick("prompt"),
        negative_prompt=pick("prompt"),
        width=pick("size"),
        height=pick("size"),
        num_inference_steps=pick("steps"),
        guidance_scale=pick("float"),
        scheduler=pick("scheduler"),
        model_id=pick("model"),
    )
    if draw(st.booleans()):
        params.seed = draw(st.integers(-(2**63), 2**63 - 1))
    request = gateway_pb2.GenerateRequest(
        params=params,
        loras=[common_pb2.LoraRef(lora_id=pick("lora"), scale=pick("scale")) for _ in range(pick("count"))],
        controlnets=[
            common_pb2.ControlNetInput(
                controlnet_id=pick("controlnet"),
                image=pick("image"),
                conditioning_scale=pick("scale"),
                guidance_start=draw(st.sampled_from([0.0, 0.2])) if "float" not in broken else pick("float"),
                guidance_end=draw(st.sampled_from([0.0, 0.8, 1.0])) if "float" not in broken else pick("float"),
                guess_mode=draw(st.booleans()),
            )
            for _ in range(pick("count"))
        ],
        request_id=pick("request_id"),
        preview_every_n_steps=pick("small"),
        controlnet_wire_dtype=pick("wire"),
    )
    if draw(st.booleans()):
        request.lora_bound_steps = pick("small")
    return request


@FUZZ
@given(request=generate_requests())
def test_any_generate_request_gets_an_image_or_a_clean_status(gateway, request):
    stub, _, _ = gateway
    try:
        response = stub.Generate(request, timeout=60)
    except grpc.RpcError as error:
        event(error.code().name)  # the statistics show what the cases reached
        assert error.code() in CLEAN, (error.code(), error.details())
        assert len(error.details()) < 600, error.details()
        return
    event("OK")
    image = PIL.Image.open(io.BytesIO(response.image_png))
    width = request.params.width or 64
    height = request.params.height or 64
    assert image.size == (width, height)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(data=st.binary(max_size=256))
def test_any_bytes_get_a_response_or_invalid_argument(gateway, data):
    _, channel, _ = gateway
    generate = channel.unary_unary("/swiftd.v1.Gateway/Generate")
    try:
        generate(data, timeout=60)
    except grpc.RpcError as error:  # bytes that parse as a message are a request like any other
        assert error.code() in CLEAN, (error.code(), error.details())


def test_the_suite_serves_after_the_fuzzing(gateway):
    stub, _, services = gateway
    assert all(service.process.poll() is None for service in services)
    request = gateway_pb2.GenerateRequest(
        params=common_pb2.GenerationParams(prompt="a cat", num_inference_steps=2, model_id=MODEL),
        loras=[common_pb2.LoraRef(lora_id=LORA, scale=0.8)],
        controlnets=[common_pb2.ControlNetInput(controlnet_id=CN, image=edge_image(64))],
    )
    response = stub.Generate(request, timeout=60)
    assert PIL.Image.open(io.BytesIO(response.image_png)).size == (64, 64)
