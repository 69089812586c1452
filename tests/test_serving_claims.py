"""Serving behaviours the README and docs/architecture.md promise, each against real processes on
loopback: a hung ControlNet worker fails a request with DEADLINE_EXCEEDED after
`--controlnet-step-timeout`; SIGTERM drains (the request in flight finishes, one past the grace
period is cancelled, the process exits 0); the gateway admits per model; a bug is INTERNAL with an
incident id that the log repeats with the traceback; a LoRA whose shapes do not fit the base model
is FAILED_PRECONDITION and changes nothing.
"""

from __future__ import annotations

import re
import shutil
import signal
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from swiftd import rpc
from swiftd.images import edge_image
from swiftd.launcher import ServiceProcess, start_gateway, start_unet
from swiftd.v1 import common_pb2, controlnet_pb2_grpc, gateway_pb2, gateway_pb2_grpc, unet_pb2, unet_pb2_grpc

MODEL = "tiny-sd15"
OTHER_MODEL = "tiny-sd15-b"  # the same weights under a second id: a second model for the gateway
CN = "tiny-sd15-cn-edges"
LORA = "tiny-sd15-lora-peft-r4"
MISFIT = "tiny-sd15-lora-misfit"  # LORA with one layer's input width changed
MISFIT_KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight"
CORRUPT = "tiny-sd15-lora-corrupt"  # not a safetensors file at all
STEP_TIMEOUT = 2.0  # the worker's --controlnet-step-timeout
LONG_STEPS = 1000


@pytest.fixture(scope="module")
def model_root(zoo_root, tmp_path_factory):
    """The zoo's tiny SD1.5 under two model ids, its ControlNets, and three LoRAs: one that fits,
    one whose shapes do not, one that cannot be read."""
    root = tmp_path_factory.mktemp("root")
    (root / "models").mkdir()
    for model_id in (MODEL, OTHER_MODEL):
        (root / "models" / model_id).symlink_to((zoo_root / "models" / MODEL).resolve())
    (root / "controlnets").symlink_to((zoo_root / "controlnets").resolve())
    loras = root / "loras"
    loras.mkdir()
    shutil.copy(zoo_root / "loras" / f"{LORA}.safetensors", loras / f"{LORA}.safetensors")
    state = load_file(zoo_root / "loras" / f"{LORA}.safetensors")
    rank, width = state[MISFIT_KEY].shape
    state[MISFIT_KEY] = torch.randn(rank, width + 8)  # to_k takes `width` inputs, not width + 8
    save_file(state, loras / f"{MISFIT}.safetensors")
    (loras / f"{CORRUPT}.safetensors").write_bytes(b"this is not a safetensors file")
    return root


@pytest.fixture(scope="module")
def unet(model_root):
    service = start_unet(
        model_root,
        MODEL,
        num_threads=1,
        extra_args=["--controlnet-step-timeout", str(STEP_TIMEOUT), "--max-steps", str(LONG_STEPS)],
    )
    yield service
    service.stop()


def stub_for(service: ServiceProcess) -> unet_pb2_grpc.UNetWorkerStub:
    return unet_pb2_grpc.UNetWorkerStub(rpc.create_channel(service.address))


def denoise_request(steps=2, model_id=MODEL, **fields) -> unet_pb2.DenoiseRequest:
    params = common_pb2.GenerationParams(
        prompt="a lighthouse at dusk",
        width=64,
        height=64,
        num_inference_steps=steps,
        seed=7,
        scheduler=common_pb2.SCHEDULER_EULER,
        model_id=model_id,
    )
    return unet_pb2.DenoiseRequest(params=params, **fields)


def wait_idle(stub: unet_pb2_grpc.UNetWorkerStub, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5)
        if status.requests_in_flight == 0 and status.queue_length == 0:
            return
        assert time.monotonic() < deadline, f"worker still busy after {timeout} s: {status}"
        time.sleep(0.05)


def wait_for_log(service: ServiceProcess, pattern: str, start: int = 0, timeout: float = 10) -> re.Match:
    """The first line of the service's output from line `start` on that matches `pattern`."""
    deadline = time.monotonic() + timeout
    while True:
        for line in service.log_lines[start:]:
            if match := re.search(pattern, line):
                return match
        assert time.monotonic() < deadline, f"no log line matches {pattern!r}:\n{service.log_tail()}"
        time.sleep(0.05)


# -- a hung ControlNet worker ----------------------------------------------------------------------


class StalledControlNet(controlnet_pb2_grpc.ControlNetWorkerServicer):
    """A ControlNet worker that accepts the residual stream, reads what it is sent, never answers."""

    def __init__(self):
        self.steps_received = 0
        self.closed = threading.Event()  # the caller ended the stream

    def StreamResiduals(self, request_iterator, context):
        context.add_callback(self.closed.set)
        try:
            for message in request_iterator:
                if message.HasField("step"):
                    self.steps_received += 1
        except grpc.RpcError:
            pass
        self.closed.set()
        return
        yield  # a generator: the handler of a response stream


def test_a_hung_controlnet_worker_fails_the_request_after_the_step_timeout(unet):
    stalled = StalledControlNet()
    server = rpc.create_server(max_workers=4)
    controlnet_pb2_grpc.add_ControlNetWorkerServicer_to_server(stalled, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stub = stub_for(unet)
    try:
        attachment = unet_pb2.ControlNetAttachment(
            input=common_pb2.ControlNetInput(controlnet_id=CN, image=edge_image(64)),
            worker_address=f"127.0.0.1:{port}",
        )
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            # The caller's deadline is far off: what ends the request is the worker's step timeout.
            stub.Denoise(denoise_request(steps=4, controlnets=[attachment]), timeout=30)
        elapsed = time.monotonic() - t0
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.value.details()
        assert f"no residuals within {STEP_TIMEOUT:.0f} s" in error.value.details()
        assert stalled.steps_received == 1  # it stopped at the first step, which never got its residuals
        assert STEP_TIMEOUT <= elapsed < STEP_TIMEOUT + 8
        assert stalled.closed.wait(5), "the worker left its stream to the hung ControlNet worker open"
    finally:
        server.stop(None)
    # The worker is healthy and serves the next request.
    wait_idle(stub)
    assert stub.Denoise(denoise_request(), timeout=60).image_png


# -- errors ----------------------------------------------------------------------------------------


def test_a_lora_whose_shapes_do_not_fit_is_failed_precondition_and_changes_nothing(unet):
    stub = stub_for(unet)
    stub.Denoise(denoise_request(loras=[common_pb2.LoraRef(lora_id=LORA, scale=0.5)]), timeout=60)
    before = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5).applied_loras
    assert [(x.lora_id, x.scale) for x in before] == [(LORA, 0.5)]
    with pytest.raises(grpc.RpcError) as error:
        stub.Denoise(denoise_request(loras=[common_pb2.LoraRef(lora_id=MISFIT, scale=1.0)]), timeout=60)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()
    details = error.value.details()
    assert MISFIT in details and "attn1.to_k" in details, details  # names the LoRA and the layer
    after = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5).applied_loras
    assert list(after) == list(before)  # no partial patch: the set in place stays


def test_an_unexpected_error_is_internal_with_an_incident_id_the_log_repeats(unet):
    stub = stub_for(unet)
    logged_before = len(unet.log_lines)
    with pytest.raises(grpc.RpcError) as error:
        stub.Denoise(denoise_request(loras=[common_pb2.LoraRef(lora_id=CORRUPT, scale=1.0)]), timeout=60)
    assert error.value.code() == grpc.StatusCode.INTERNAL, error.value.details()
    details = error.value.details()
    incident = re.fullmatch(r"internal error \(incident ([0-9a-f]{12}); details in the server log\)", details)
    assert incident, details  # the caller learns nothing but the id
    assert "safetensors" not in details.lower() and "Traceback" not in details
    # The log has the same id, with the traceback right after it.
    match = wait_for_log(unet, rf"failed \(incident {incident.group(1)}\)", logged_before)
    at = next(i for i in range(logged_before, len(unet.log_lines)) if match.group(0) in unet.log_lines[i])
    deadline = time.monotonic() + 5
    while len(unet.log_lines) <= at + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert unet.log_lines[at + 1 : at + 2] == ["Traceback (most recent call last):"], unet.log_tail()
    # The server keeps running.
    health = health_pb2_grpc.HealthStub(rpc.create_channel(unet.address))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Denoise(denoise_request(), timeout=60).image_png


# -- admission per model ---------------------------------------------------------------------------


def until_started(stream) -> gateway_pb2.Plan:
    return next(e.started.plan for e in stream if e.HasField("started"))


GRACE = 4.0  # OTHER_MODEL's worker's --grace-seconds


@pytest.fixture(scope="module")
def other(model_root):
    """OTHER_MODEL's worker: the gateway's second model, then drained by the last test (one start
    fewer)."""
    service = start_unet(
        model_root,
        OTHER_MODEL,
        num_threads=1,
        extra_args=["--grace-seconds", str(GRACE), "--max-steps", str(LONG_STEPS)],
    )
    yield service
    service.stop()


def test_one_models_full_queue_never_holds_up_another_model(unet, other):
    assert other.process.poll() is None, "drained already: this test runs before the SIGTERM test"
    gateway = start_gateway(
        [unet.address, other.address],
        extra_args=["--max-queue", "1", "--per-worker-concurrency", "1", "--max-steps", str(LONG_STEPS)],
    )
    stub = gateway_pb2_grpc.GatewayStub(rpc.create_channel(gateway.address))

    def generate(model_id, steps):
        return gateway_pb2.GenerateRequest(params=denoise_request(steps, model_id).params)

    streams = []
    try:
        # MODEL: its one slot taken, its one queue place taken, a third request refused.
        streams.append(stub.GenerateStream(generate(MODEL, LONG_STEPS), timeout=120))
        assert until_started(streams[-1]).unet_worker == unet.address
        streams.append(stub.GenerateStream(generate(MODEL, 2), timeout=120))
        assert next(streams[-1]).queued.position == 0
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(generate(MODEL, 2), timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.details()

        # OTHER_MODEL starts at once (never queued) and completes meanwhile.
        events = list(stub.GenerateStream(generate(OTHER_MODEL, 2), timeout=60))
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "started" and kinds[-1] == "final" and "queued" not in kinds, kinds
        assert events[0].started.plan.unet_worker == other.address
        assert events[-1].final.image_png
    finally:
        for stream in streams:
            stream.cancel()
        wait_idle(stub_for(unet))
        gateway.stop()


# -- SIGTERM drain ---------------------------------------------------------------------------------


def test_sigterm_drains_finishing_the_request_in_flight_and_exits_0(other):
    stub = stub_for(other)
    watch = health_pb2_grpc.HealthStub(rpc.create_channel(other.address)).Watch(
        health_pb2.HealthCheckRequest(), timeout=60
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    # In flight: a short request (running), and a long one waiting behind it for the pipeline.
    short = stub.DenoiseStream(denoise_request(steps=8, model_id=OTHER_MODEL, request_id="drain-short"), timeout=60)
    assert next(short).HasField("progress")
    long = stub.DenoiseStream(
        denoise_request(steps=LONG_STEPS, model_id=OTHER_MODEL, request_id="drain-long"), timeout=120
    )
    deadline = time.monotonic() + 10
    while stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5).queue_length < 1:
        assert time.monotonic() < deadline, "the long request never reached the worker"
        time.sleep(0.02)

    t_signal = time.monotonic()
    other.process.send_signal(signal.SIGTERM)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as refused:  # no new work once draining
        stub.Denoise(denoise_request(model_id=OTHER_MODEL), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()

    # The request in flight completes within the grace period...
    events = list(short)
    assert events[-1].HasField("final") and events[-1].final.image_png
    assert [e.progress.step for e in events if e.HasField("progress")][-1] == 8
    # ... the one that would run past it is cut off at the end of the grace period, as
    # UNAVAILABLE (gRPC's "Cancelling all calls"): the server went away, worth a retry elsewhere ...
    with pytest.raises(grpc.RpcError) as cut_off:
        for _ in long:
            pass
    assert cut_off.value.code() == grpc.StatusCode.UNAVAILABLE, cut_off.value.details()
    assert GRACE - 0.5 < time.monotonic() - t_signal < GRACE + 5
    # ... its loop stopped at a step boundary, and the process exits 0.
    assert other.process.wait(timeout=GRACE + 15) == 0, other.log_tail()
    wait_for_log(other, r"request drain-long: request cancelled before step \d+")
