"""Hostile input stays within its limits: over-long prompts and ids, messages larger than the
largest valid request, images that declare more pixels than allowed, bytes that are not the
message. Each gets INVALID_ARGUMENT naming the field (or RESOURCE_EXHAUSTED from gRPC for a
message over the size limit), short, before any work; and the services serve on. Real processes:
a gateway and a UNet worker on loopback."""

from __future__ import annotations

import io

import grpc
import PIL.Image
import pytest

from swiftd import rpc
from swiftd.errors import MAX_ECHO
from swiftd.images import edge_image, encode_png
from swiftd.launcher import start_gateway, start_unet
from swiftd.request import Limits
from swiftd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, unet_pb2, unet_pb2_grpc

MODEL = "tiny-sd15"
CN = "tiny-sd15-cn-edges"


@pytest.fixture(scope="module")
def suite(zoo_root):
    unet = start_unet(zoo_root, MODEL, num_threads=1)
    gateway = start_gateway([unet.address])
    channels = [rpc.create_channel(gateway.address), rpc.create_channel(unet.address)]
    yield gateway_pb2_grpc.GatewayStub(channels[0]), unet_pb2_grpc.UNetWorkerStub(channels[1]), channels
    for channel in channels:
        channel.close()
    gateway.stop()
    unet.stop()
    assert gateway.process.returncode == 0 and unet.process.returncode == 0


def _params(**overrides) -> common_pb2.GenerationParams:
    return common_pb2.GenerationParams(
        **{"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 2, "model_id": MODEL, **overrides}
    )


def _refused(call, request, code=grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=30)
    assert error.value.code() == code, error.value.details()
    return error.value.details()


def test_over_long_prompts_and_ids_are_refused_naming_the_field_in_a_short_message(suite):
    gateway, unet, _ = suite
    limit = Limits().max_prompt_length
    for field in ("prompt", "negative_prompt"):
        long_text = {field: "a cat " * (limit // 6 + 1)}
        assert f"params.{field}" in _refused(gateway.Generate, gateway_pb2.GenerateRequest(params=_params(**long_text)))
        assert f"params.{field}" in _refused(unet.Denoise, unet_pb2.DenoiseRequest(params=_params(**long_text)))
    huge_id = "m" * (16 * 1024)  # echoed whole, it would overflow the client's metadata limit
    for call, request in (
        (gateway.Generate, gateway_pb2.GenerateRequest(params=_params(model_id=huge_id))),
        (unet.Denoise, unet_pb2.DenoiseRequest(params=_params(model_id=huge_id))),
        (gateway.Generate, gateway_pb2.GenerateRequest(params=_params(), loras=[common_pb2.LoraRef(lora_id=huge_id)])),
    ):
        details = _refused(call, request)
        assert "model_id" in details or "lora_id" in details
        assert len(details) < 4 * MAX_ECHO, len(details)
    # An id of valid form that names nothing: NOT_FOUND, the id quoted.
    details = _refused(
        gateway.Generate, gateway_pb2.GenerateRequest(params=_params(model_id="x" * 100)), grpc.StatusCode.NOT_FOUND
    )
    assert "params.model_id" in details and len(details) < 4 * MAX_ECHO


def test_images_are_bounded_by_bytes_and_by_the_pixels_their_header_declares(suite):
    gateway, unet, _ = suite
    limits = Limits()
    bomb = encode_png(PIL.Image.new("L", (12000, 12000)))  # zeros: a few KB declaring 144 M pixels
    assert len(bomb) < 1024 * 1024
    cn = common_pb2.ControlNetInput(controlnet_id=CN, image=bomb)
    details = _refused(gateway.Generate, gateway_pb2.GenerateRequest(params=_params(), controlnets=[cn]))
    assert "controlnets[0].image" in details and "12000x12000" in details
    attachment = unet_pb2.ControlNetAttachment(input=cn)
    details = _refused(unet.Denoise, unet_pb2.DenoiseRequest(params=_params(), controlnets=[attachment]))
    assert "controlnets[0].input.image" in details

    # Within the message limit but over one image's: named.
    padded = edge_image(64) + b"\0" * (limits.max_image_bytes + 1)
    cn = common_pb2.ControlNetInput(controlnet_id=CN, image=padded)
    assert "controlnets[0].image" in _refused(
        gateway.Generate, gateway_pb2.GenerateRequest(params=_params(), controlnets=[cn])
    )
    # Over the largest valid request: gRPC refuses the message before it is read into memory.
    junk = b"\0" * (limits.max_request_bytes + 1)
    cn = common_pb2.ControlNetInput(controlnet_id=CN, image=junk)
    _refused(
        gateway.Generate,
        gateway_pb2.GenerateRequest(params=_params(), controlnets=[cn]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


def test_bytes_that_are_not_the_message_are_invalid_argument_on_unary_and_streaming_rpcs(suite):
    _, _, (gateway_channel, unet_channel) = suite
    garbage = b"\xff\xff\xff\xff\x0f" + b"\x12\x80\x80" * 5  # a truncated varint, then a bad length
    for channel, method in (
        (gateway_channel, "/swiftd.v1.Gateway/Generate"),
        (gateway_channel, "/swiftd.v1.Gateway/GenerateStream"),
        (unet_channel, "/swiftd.v1.UNetWorker/Denoise"),
    ):
        call = (channel.unary_stream if method.endswith("Stream") else channel.unary_unary)(method)
        with pytest.raises(grpc.RpcError) as error:
            response = call(garbage, timeout=30)
            if method.endswith("Stream"):
                list(response)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.value.details())
        assert "request" in error.value.details()
    # A request stream: each message is parsed as it is read.
    receive = unet_channel.stream_unary("/swiftd.v1.UNetWorker/ReceiveLoraDeltas")
    with pytest.raises(grpc.RpcError) as error:
        receive(iter([garbage]), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()


def test_the_suite_serves_after_the_hostile_requests(suite):
    gateway, _, _ = suite
    cn = common_pb2.ControlNetInput(controlnet_id=CN, image=edge_image(64))
    response = gateway.Generate(gateway_pb2.GenerateRequest(params=_params(), controlnets=[cn]), timeout=120)
    assert PIL.Image.open(io.BytesIO(response.image_png)).size == (64, 64)


def test_the_lora_inbox_budget_counts_transfers_under_way_and_drops_stalled_ones(zoo_root):
    """Pushes that never finish once grew a worker far past its LoRA budget. Now the deltas under
    way count: a push that would exceed the budget is refused (RESOURCE_EXHAUSTED), and a push idle
    for --lora-stall-seconds is dropped, freeing its bytes for the next."""
    import threading
    import time

    import torch

    from swiftd.loading import load_pipeline
    from swiftd.lora import deltas_to_chunks, extract_deltas, prepare_deltas

    lora = "tiny-sd15-lora-peft-r4"
    pipe = load_pipeline(zoo_root / "models" / MODEL, dtype=torch.float32)
    deltas = prepare_deltas(extract_deltas(pipe, zoo_root / "loras" / f"{lora}.safetensors"), 1.0, torch.float32)
    size = sum(d.nbytes for d in deltas.values())
    budget_mib, stall = 1.0, 3.0
    fits = int(budget_mib * (1 << 20) // size)  # transfers of this LoRA the budget holds
    worker = start_unet(
        zoo_root,
        MODEL,
        num_threads=1,
        extra_args=["--lora-cache-mib", str(budget_mib), "--lora-stall-seconds", str(stall)],
    )
    channel = rpc.create_channel(worker.address)
    stub = unet_pb2_grpc.UNetWorkerStub(channel)
    release = threading.Event()

    def push(scale: float, finish: bool):
        chunks = list(deltas_to_chunks(lora, scale, deltas, chunk_bytes=32 * 1024))
        sent = threading.Event()

        def stream():
            yield from chunks[:-1]
            sent.set()
            if not finish:
                release.wait(60)  # a push that stops sending
            yield chunks[-1]

        call = stub.ReceiveLoraDeltas.future(stream(), timeout=60)
        sent.wait(30)
        return call

    try:
        stalled = [push(0.1 * (i + 1), finish=False) for i in range(fits)]
        time.sleep(0.3)
        assert not any(call.done() for call in stalled)
        over = push(0.9, finish=False)  # one more does not fit beside those under way
        with pytest.raises(grpc.RpcError) as refused:
            over.result(timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        assert "budget" in refused.value.details()

        time.sleep(stall + 0.5)  # the unfinished pushes go idle past the stall limit
        fresh = push(1.0, finish=True)
        assert list(fresh.result(timeout=30).lora_ids) == [lora]
        release.set()
        for call in stalled:  # their last chunk arrives too late: the transfer was dropped
            with pytest.raises(grpc.RpcError) as dropped:
                call.result(timeout=30)
            assert dropped.value.code() == grpc.StatusCode.UNAVAILABLE, dropped.value.details()
        status = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=10)
        assert [(c.lora_id, round(c.scale, 3)) for c in status.cached_loras] == [(lora, 1.0)]
    finally:
        release.set()
        channel.close()
        worker.stop()
    assert worker.process.returncode == 0, worker.log_tail()


def test_services_dial_only_their_configured_peers(zoo_root, tmp_path):
    """An address in a request (a worker to push deltas to, a ControlNet worker, a LoRA store) is
    dialed only if it is one of the service's configured peers (--push-to, --peers); any other is
    PERMISSION_DENIED naming the field, and nothing connects to it."""
    import socket

    from swiftd.launcher import start_lora_store
    from swiftd.v1 import lora_store_pb2, lora_store_pb2_grpc

    listener = socket.create_server(("127.0.0.1", 0))  # a victim: it must never see a connection
    listener.settimeout(0.5)
    victim = f"127.0.0.1:{listener.getsockname()[1]}"
    unet = start_unet(zoo_root, MODEL, num_threads=1, extra_args=["--peers", "127.0.0.1:9"])
    store = start_lora_store(
        zoo_root, tmp_path / "cache", [MODEL], num_threads=1, extra_args=["--push-to", unet.address]
    )
    channels = [rpc.create_channel(unet.address), rpc.create_channel(store.address)]
    worker, lora_store = unet_pb2_grpc.UNetWorkerStub(channels[0]), lora_store_pb2_grpc.LoraStoreStub(channels[1])
    try:
        push = lora_store_pb2.PushLorasRequest(
            loras=[common_pb2.LoraRef(lora_id="tiny-sd15-lora-peft-r4", scale=1.0)],
            base_model_id=MODEL,
            dtype=common_pb2.DTYPE_FLOAT32,
        )
        push.unet_worker_address = victim
        assert "unet_worker_address" in _refused(lora_store.PushLoras, push, grpc.StatusCode.PERMISSION_DENIED)
        push.unet_worker_address = unet.address  # the configured one
        assert lora_store.PushLoras(push, timeout=60).parameters_sent > 0

        cn = unet_pb2.ControlNetAttachment(
            input=common_pb2.ControlNetInput(controlnet_id=CN, image=edge_image(64)), worker_address=victim
        )
        details = _refused(
            worker.Denoise,
            unet_pb2.DenoiseRequest(params=_params(), controlnets=[cn]),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert "controlnets[0].worker_address" in details
        stray_store = unet_pb2.DenoiseRequest(
            params=_params(), loras=[common_pb2.LoraRef(lora_id="tiny-sd15-lora-peft-r4")], lora_store_address=victim
        )
        assert "lora_store_address" in _refused(worker.Denoise, stray_store, grpc.StatusCode.PERMISSION_DENIED)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
        for channel in channels:
            channel.close()
        store.stop()
        unet.stop()


def test_a_transfer_that_has_not_begun_is_not_dropped_as_stalled():
    """The stall limit is for transfers that went quiet: a pushed LoRA whose first chunk is late
    (a store reloading a base model) waits for it, bounded by the request's own wait timeout."""
    import time

    import torch

    from services.unet.lora_inbox import LoraInbox
    from swiftd.lora import WeightDelta
    from swiftd.request import LoraSet

    inbox = LoraInbox(1 << 20, torch.float32, MODEL, wait_timeout=10, stall_timeout=0.2)
    fetch = inbox.fetch(LoraSet.of([("late", 1.0)]), "r-late", pushed=["late"])
    time.sleep(0.3)
    inbox.put("other", 1.0, [("unet.a.weight", WeightDelta(torch.ones(2, 2)))], last=True)  # runs the budget
    inbox.put("late", 1.0, [("unet.b.weight", WeightDelta(torch.ones(2, 2)))], last=True)  # arrives at last
    [(lora_id, deltas)] = fetch.unet_deltas()
    assert lora_id == "late" and list(deltas) == ["unet.b.weight"]


def test_calls_waiting_for_a_thread_are_bounded_and_the_rest_refused_at_once():
    """Beyond --max-workers running and --max-waiting-rpcs waiting, a call is RESOURCE_EXHAUSTED at
    once: calls queued for a thread hold their messages in gRPC's buffers, which no budget counts
    (64 unfinished LoRA pushes grew a full-size worker by 188 MiB before, bench/hostile.py)."""
    import threading
    import time

    release, entered = threading.Event(), threading.Event()

    def hold(request, context):  # a call that keeps its thread until released
        entered.set()
        release.wait(30)
        return request

    server = rpc.create_server(1, max_waiting=1)
    handler = grpc.unary_unary_rpc_method_handler(hold)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Hold", {"Hold": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/test.Hold/Hold")
    try:
        running = call.future(b"a", timeout=30)
        assert entered.wait(10)  # it holds the one thread
        waiting = call.future(b"b", timeout=30)
        time.sleep(0.3)  # at the server by now, queued for the thread
        with pytest.raises(grpc.RpcError) as refused:
            call(b"c", timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not running.done() and not waiting.done()
        release.set()
        assert (running.result(), waiting.result()) == (b"a", b"b")  # the waiting one got its turn
    finally:
        release.set()
        channel.close()
        server.stop(None)
