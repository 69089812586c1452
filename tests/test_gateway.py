"""The whole suite through the gateway: four kinds of service as separate processes on loopback
(two UNet workers, two ControlNet workers, the LoRA store, the gateway), exporting traces over
OTLP to an in-memory collector.

Images through the gateway equal the UNet worker's own for the same plan and seed; validation
errors carry the right status and name the field; planning follows LoRA affinity and load; a
cancelled or expired request frees its worker; one request is one trace across all services.
"""

from __future__ import annotations

import io
import re
import time

import grpc
import numpy as np
import PIL.Image
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from swiftd import rpc
from swiftd.images import edge_image
from swiftd.launcher import start_controlnet, start_gateway, start_lora_store, start_unet
from swiftd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, unet_pb2, unet_pb2_grpc
from tests.model_roots import BOGUS, make_root
from tests.otlp_collector import InMemoryCollector

MODEL = "tiny-sd15"
EDGES, DEPTH = "tiny-sd15-cn-edges", "tiny-sd15-cn-depth"
PEFT, KOHYA_TE, CONV, R64 = (f"tiny-sd15-lora-{n}" for n in ("peft-r4", "kohya-r16-te", "kohya-r8-conv", "peft-r64"))
STEPS = 4
LONG_STEPS = 1000  # long enough that finishing it would take far longer than the checks below


@pytest.fixture(scope="module")
def suite(zoo_root, tmp_path_factory):
    collector = InMemoryCollector().start()
    env = collector.env
    zoo_root = make_root(zoo_root, tmp_path_factory.mktemp("root"))  # the zoo plus a LoRA the store refuses
    store = start_lora_store(
        zoo_root,
        tmp_path_factory.mktemp("lora-cache"),
        base_models=[MODEL],
        cpu_cores=[1],
        num_threads=1,
        env=env,
        wait=False,
    )
    controlnets = [
        start_controlnet(zoo_root, preload=[EDGES, DEPTH], cpu_cores=[1], num_threads=1, env=env, wait=False)
        for _ in range(2)
    ]
    unets = [
        start_unet(
            zoo_root,
            MODEL,
            cpu_cores=[0],
            num_threads=1,
            env=env,
            wait=False,
            extra_args=["--max-steps", str(LONG_STEPS)],
        )
        for _ in range(2)
    ]
    for service in (store, *controlnets, *unets):
        service.wait_ready()
    gateway = start_gateway(
        [u.address for u in unets],
        [c.address for c in controlnets],
        store.address,
        extra_args=[
            "--max-steps",
            str(LONG_STEPS),
            "--max-size",
            "512",
            "--max-loras",
            "2",
            "--max-controlnets",
            "2",
            "--max-queue",
            "1",
        ],
        env=env,
    )
    channel = rpc.create_channel(gateway.address)
    yield {
        "gateway": gateway,
        "stub": gateway_pb2_grpc.GatewayStub(channel),
        "unets": unets,
        "controlnets": controlnets,
        "store": store,
        "collector": collector,
    }
    channel.close()
    for service in (gateway, *unets, *controlnets, store):
        service.stop()
    collector.stop()


def generate_request(loras=(), controlnets=(), steps=STEPS, seed=11, **extra) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        params=common_pb2.GenerationParams(
            prompt="a lighthouse at dusk",
            negative_prompt="blurry",
            width=64,
            height=64,
            num_inference_steps=steps,
            guidance_scale=7.5,
            seed=seed,
            scheduler=common_pb2.SCHEDULER_EULER,
            model_id=MODEL,
        ),
        loras=[common_pb2.LoraRef(lora_id=i, scale=s) for i, s in loras],
        controlnets=[
            common_pb2.ControlNetInput(controlnet_id=c, image=edge_image(64), conditioning_scale=s)
            for c, s in controlnets
        ],
        **extra,
    )


def unet_stub(address: str) -> unet_pb2_grpc.UNetWorkerStub:
    return unet_pb2_grpc.UNetWorkerStub(rpc.create_channel(address))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"))


def reset_workers(suite) -> None:
    """Back to pristine weights on both workers (a request without LoRAs removes any set)."""
    for unet in suite["unets"]:
        request = unet_pb2.DenoiseRequest(params=generate_request(steps=1).params)
        unet_stub(unet.address).Denoise(request, timeout=60)


def wait_idle(address: str, timeout: float) -> float:
    """Seconds until the worker reports nothing running or queued."""
    stub = unet_stub(address)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5)
        if status.requests_in_flight == 0 and status.queue_length == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{address} still busy after {timeout} s")


# -- equivalence -----------------------------------------------------------------------------------

CASES = {
    "plain": dict(),
    "cn1_lora1": dict(loras=[(PEFT, 0.8)], controlnets=[(EDGES, 1.0)]),
    "cn2_lora2": dict(loras=[(R64, 0.5), (KOHYA_TE, 0.9)], controlnets=[(EDGES, 0.8), (DEPTH, 0.6)]),
}


def direct_request(request: gateway_pb2.GenerateRequest, plan: gateway_pb2.Plan, store: str) -> unet_pb2.DenoiseRequest:
    """The same request, sent by hand to the planned workers (no gateway)."""
    return unet_pb2.DenoiseRequest(
        params=request.params,
        loras=request.loras,
        lora_store_address=store,
        controlnets=[
            unet_pb2.ControlNetAttachment(input=cn, worker_address=a.worker)
            for cn, a in zip(request.controlnets, plan.controlnets)
        ],
    )


@pytest.mark.parametrize("case", [*CASES, "stream"])
def test_gateway_image_equals_direct_unet_call(suite, case):
    request = generate_request(**CASES.get(case, CASES["cn1_lora1"]))
    if case == "stream":
        request.preview_every_n_steps = 2
        events = list(suite["stub"].GenerateStream(request, timeout=120))
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] in ("queued", "started") and kinds[-1] == "final" and kinds.count("final") == 1
        steps = [e.progress.step for e in events if e.HasField("progress")]
        assert steps == list(range(1, STEPS + 1))
        assert [e.preview.step for e in events if e.HasField("preview")] == [2]
        started = next(e.started for e in events if e.HasField("started"))
        response = events[-1].final
        # The final plan adds only how residuals travelled (negotiated by the workers as they ran).
        negotiated = gateway_pb2.Plan()
        negotiated.CopyFrom(response.plan)
        for assignment in negotiated.controlnets:
            assignment.transport = common_pb2.RESIDUAL_TRANSPORT_UNSPECIFIED
        assert started.plan == negotiated
    else:
        response = suite["stub"].Generate(request, timeout=120)

    plan = response.plan
    assert plan.unet_worker in [u.address for u in suite["unets"]]
    assert [a.controlnet_id for a in plan.controlnets] == [c.controlnet_id for c in request.controlnets]
    # Residuals from a ControlNet worker on this host cross shared memory; in-process ones nothing.
    assert [a.transport for a in plan.controlnets] == [
        common_pb2.RESIDUAL_TRANSPORT_SHARED_MEMORY if a.worker else common_pb2.RESIDUAL_TRANSPORT_UNSPECIFIED
        for a in plan.controlnets
    ]
    if len(plan.controlnets) == 2:  # one worker per ControlNet: they run side by side
        assert len({a.worker for a in plan.controlnets}) == 2
    assert list(plan.lora_ids) == [lora.lora_id for lora in request.loras]
    assert response.seed == request.params.seed and response.request_id
    assert len(response.trace_id) == 32 and int(response.trace_id, 16)
    assert response.lora_applied_at_step == (0 if request.loras else -1)
    stages = [t.stage for t in response.timings]
    before_plan = ["validate", "queue", *(["decode_images"] if request.controlnets else []), "plan"]
    assert stages[: len(before_plan)] == before_plan and stages[-1] == "total" and "denoise" in stages

    direct = unet_stub(plan.unet_worker).Denoise(direct_request(request, plan, suite["store"].address), timeout=120)
    assert np.array_equal(pixels(response.image_png), pixels(direct.image_png))


# -- planning --------------------------------------------------------------------------------------


def test_lora_affinity_and_push(suite):
    reset_workers(suite)
    stub = suite["stub"]
    first = stub.Generate(generate_request(loras=[(CONV, 0.7)]), timeout=120).plan
    assert not first.lora_set_already_applied and list(first.pushed_lora_ids) == [CONV]

    again = stub.Generate(generate_request(loras=[(CONV, 0.7)]), timeout=120).plan
    assert again.unet_worker == first.unet_worker
    assert again.lora_set_already_applied and not again.pushed_lora_ids

    # Another set goes to the other (pristine) worker, keeping the first set's affinity.
    other = stub.Generate(generate_request(loras=[(PEFT, 0.3)]), timeout=120).plan
    assert other.unet_worker != first.unet_worker and list(other.pushed_lora_ids) == [PEFT]

    # Back on the first worker the deltas are still held: patched again, but nothing travels.
    status = unet_stub(first.unet_worker).GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5)
    assert (CONV, pytest.approx(0.7)) in [(r.lora_id, r.scale) for r in status.cached_loras]


def test_concurrent_requests_go_to_different_workers(suite):
    assert_both_slots_free(suite)


# -- deadlines and cancellation --------------------------------------------------------------------


# The worker checks for a cancelled caller at every step boundary: it stops before the step after
# the one running when the cancellation arrives. Progress events travel (worker -> gateway ->
# client) while the loop goes on: allow up to IN_FLIGHT_STEPS more steps done than the client had
# seen when it cancelled.
IN_FLIGHT_STEPS = 2


def test_cancelled_stream_stops_the_workers_loop_within_a_step(suite):
    logged_before = {u.address: len(u.log_lines) for u in suite["unets"]}
    request = generate_request(steps=LONG_STEPS, controlnets=[(EDGES, 1.0)], request_id="gw-cancel-me")
    stream = suite["stub"].GenerateStream(request, timeout=300)
    plan, seen = None, 0
    for event in stream:
        if event.HasField("started"):
            plan = event.started.plan
        elif event.HasField("progress"):
            seen = event.progress.step  # steps done
            if seen == 3:
                break
    stream.cancel()
    wait_idle(plan.unet_worker, 30)
    unet = next(u for u in suite["unets"] if u.address == plan.unet_worker)
    pattern = re.compile(r"request gw-cancel-me: request cancelled before step (\d+)")
    deadline = time.monotonic() + 5  # the worker logs just after it frees itself
    while not (stopped := [m for line in unet.log_lines[logged_before[unet.address] :] if (m := pattern.search(line))]):
        assert time.monotonic() < deadline, unet.log_tail()
        time.sleep(0.05)
    assert seen <= int(stopped[0].group(1)) <= seen + 1 + IN_FLIGHT_STEPS, (seen, stopped[0].group(0))
    assert_both_slots_free(suite)


def until_started(stream) -> gateway_pb2.Plan:
    """Read a stream up to its `started` event (a slot still being released may queue it briefly)."""
    return next(e.started.plan for e in stream if e.HasField("started"))


def assert_both_slots_free(suite):
    """Two requests start side by side (two workers, one slot each): no slot leaked. A leaked one
    would leave the second queued until its 20 s deadline."""
    streams = [suite["stub"].GenerateStream(generate_request(steps=LONG_STEPS), timeout=20) for _ in range(2)]
    try:
        assert {until_started(s).unet_worker for s in streams} == {u.address for u in suite["unets"]}
    finally:
        for stream in streams:
            stream.cancel()
    for unet in suite["unets"]:
        wait_idle(unet.address, 10)


def test_queue_positions_limit_and_cancel_while_queued(suite):
    stub = suite["stub"]
    running = [stub.GenerateStream(generate_request(steps=LONG_STEPS), timeout=120) for _ in range(2)]
    waiting = []
    try:
        for stream in running:
            until_started(stream)
        waiting.append(stub.GenerateStream(generate_request(steps=2), timeout=120))
        assert next(waiting[0]).queued.position == 0
        with pytest.raises(grpc.RpcError) as error:  # --max-queue 1: no room for another
            stub.Generate(generate_request(steps=2), timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in error.value.details()
        waiting[0].cancel()  # leaves the queue: the place is free again
        deadline = time.monotonic() + 10
        while True:
            waiting.append(stub.GenerateStream(generate_request(steps=2), timeout=120))
            try:
                assert next(waiting[-1]).queued.position == 0
                break
            except grpc.RpcError as exc:  # the cancellation may take a moment to reach the gateway
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)
        running.pop(0).cancel()  # a slot frees: the queued request starts and completes
        events = [e.WhichOneof("event") for e in waiting[-1]]
        assert events[0] == "started" and events[-1] == "final"
    finally:
        for stream in running + waiting:
            stream.cancel()
    for unet in suite["unets"]:
        wait_idle(unet.address, 10)


def test_client_deadline_propagates_to_the_worker(suite):
    logged_before = {u.address: len(u.log_lines) for u in suite["unets"]}
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        suite["stub"].Generate(generate_request(steps=LONG_STEPS), timeout=4.0)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for unet in suite["unets"]:
        wait_idle(unet.address, 10)
    assert time.monotonic() - t0 < 15
    # It did run on a worker, which stopped its loop at the deadline.
    deadline = time.monotonic() + 5
    while not any(
        "cancelled before step" in line for u in suite["unets"] for line in u.log_lines[logged_before[u.address] :]
    ):
        assert time.monotonic() < deadline, "no worker stopped a loop at the deadline"
        time.sleep(0.05)


def test_a_lora_the_store_refuses_fails_the_request_and_frees_the_worker(suite):
    # It passes the gateway's checks (a known sd15 LoRA); preparing it fails at the store, so the
    # worker must not sit waiting for deltas that never come.
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        suite["stub"].Generate(
            generate_request(loras=[(BOGUS, 1.0)], lora_bound_steps=2, steps=LONG_STEPS), timeout=120
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "lora_unet_nonexistent_layer" in error.value.details()
    for unet in suite["unets"]:
        wait_idle(unet.address, 10)
    assert time.monotonic() - t0 < 30  # not the worker's 120 s wait for deltas
    assert suite["stub"].Generate(generate_request(loras=[(PEFT, 1.0)]), timeout=60).image_png


# -- validation ------------------------------------------------------------------------------------


def _image(size, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size).save(buffer, format=fmt)
    return buffer.getvalue()


def _with(**changes):
    def mutate(r: gateway_pb2.GenerateRequest):
        for path, value in changes.items():
            target, *rest = path.split("__")
            if rest:
                setattr(getattr(r, target), rest[0], value)
            else:
                setattr(r, target, value)
        return r

    return mutate


def _cn(**fields):
    def mutate(r):
        r.controlnets.add(controlnet_id=EDGES, image=edge_image(64)).MergeFrom(common_pb2.ControlNetInput(**fields))
        if "image" in fields:
            r.controlnets[0].image = fields["image"]
        return r

    return mutate


def _loras(*pairs):
    def mutate(r):
        r.loras.extend(common_pb2.LoraRef(lora_id=i, scale=s) for i, s in pairs)
        return r

    return mutate


INVALID = {
    "width not multiple of 8": (_with(params__width=60), grpc.StatusCode.INVALID_ARGUMENT, "params.width"),
    "height too large": (_with(params__height=1024), grpc.StatusCode.INVALID_ARGUMENT, "params.height"),
    "width too small": (_with(params__width=32), grpc.StatusCode.INVALID_ARGUMENT, "params.width"),
    "steps too many": (
        _with(params__num_inference_steps=LONG_STEPS + 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "params.num_inference_steps",
    ),
    "steps negative": (
        _with(params__num_inference_steps=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "params.num_inference_steps",
    ),
    "guidance negative": (
        _with(params__guidance_scale=-1.0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "params.guidance_scale",
    ),
    "guidance nan": (
        _with(params__guidance_scale=float("nan")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "params.guidance_scale",
    ),
    "scheduler unknown": (_with(params__scheduler=99), grpc.StatusCode.INVALID_ARGUMENT, "params.scheduler"),
    "model unknown": (_with(params__model_id="no-such-model"), grpc.StatusCode.NOT_FOUND, "params.model_id"),
    "lora unknown": (_loras(("no-such-lora", 1.0)), grpc.StatusCode.NOT_FOUND, "loras[0].lora_id"),
    "lora other family": (
        _loras(("tiny-sdxl-lora-peft-r4", 1.0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "loras[0].lora_id",
    ),
    "lora scale": (_loras((PEFT, 100.0)), grpc.StatusCode.INVALID_ARGUMENT, "loras[0].scale"),
    "lora twice": (_loras((PEFT, 1.0), (PEFT, 0.5)), grpc.StatusCode.INVALID_ARGUMENT, "loras[1].lora_id"),
    "too many loras": (_loras((PEFT, 1.0), (CONV, 1.0), (R64, 1.0)), grpc.StatusCode.INVALID_ARGUMENT, "loras"),
    "too many controlnets": (lambda r: _cn()(_cn()(_cn()(r))), grpc.StatusCode.INVALID_ARGUMENT, "controlnets"),
    "controlnet unknown": (_cn(controlnet_id="no-such-cn"), grpc.StatusCode.NOT_FOUND, "controlnets[0].controlnet_id"),
    "controlnet other family": (
        _cn(controlnet_id="tiny-sdxl-cn-edges"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "controlnets[0].controlnet_id",
    ),
    "controlnet scale": (
        _cn(conditioning_scale=-1.0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "controlnets[0].conditioning_scale",
    ),
    "controlnet window": (
        _cn(guidance_start=0.8, guidance_end=0.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "controlnets[0].guidance_start",
    ),
    "image empty": (_cn(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "controlnets[0].image"),
    "image undecodable": (_cn(image=b"definitely not a png"), grpc.StatusCode.INVALID_ARGUMENT, "controlnets[0].image"),
    "image truncated": (_cn(image=edge_image(64)[:200]), grpc.StatusCode.INVALID_ARGUMENT, "controlnets[0].image"),
    "image not png or jpeg": (
        _cn(image=_image((64, 64), "GIF")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "controlnets[0].image",
    ),
    "image too large": (_cn(image=_image((4104, 8))), grpc.StatusCode.INVALID_ARGUMENT, "controlnets[0].image"),
    "image wrong shape": (_cn(image=_image((64, 128))), grpc.StatusCode.INVALID_ARGUMENT, "controlnets[0].image"),
    "request id": (_with(request_id="not an id!"), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    "wire dtype": (
        _with(controlnet_wire_dtype=common_pb2.DTYPE_INT64),
        grpc.StatusCode.INVALID_ARGUMENT,
        "controlnet_wire_dtype",
    ),
    "preview": (_with(preview_every_n_steps=-1), grpc.StatusCode.INVALID_ARGUMENT, "preview_every_n_steps"),
}


def _worker_states(suite):
    states = []
    for unet in suite["unets"]:
        s = unet_stub(unet.address).GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5)
        states.append((list(s.applied_loras), s.requests_in_flight, s.queue_length))
    return states


def test_invalid_requests_are_refused_naming_the_field(suite):
    stub = suite["stub"]
    before = _worker_states(suite)
    for name, (mutate, code, field) in INVALID.items():
        for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as error:
                call(mutate(generate_request()), timeout=30)
            assert error.value.code() == code, (name, error.value.details())
            assert error.value.details().startswith(field + ":") or field in error.value.details(), (
                name,
                error.value.details(),
            )
    assert _worker_states(suite) == before  # nothing reached a worker
    # Each process answers health checks for the server and for its service's full name (what a
    # probe such as grpc_health_probe -service=swiftd.v1.Gateway asks).
    names = {"gateway": "swiftd.v1.Gateway", "unet": "swiftd.v1.UNetWorker"}
    names.update(controlnet="swiftd.v1.ControlNetWorker", lora_store="swiftd.v1.LoraStore")
    for service in (suite["gateway"], *suite["unets"], *suite["controlnets"], suite["store"]):
        health = health_pb2_grpc.HealthStub(rpc.create_channel(service.address))
        for name in ("", names[service.name]):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, (service.name, name)
    assert stub.Generate(generate_request(), timeout=60).image_png  # and the suite still serves


def test_listings(suite):
    stub = suite["stub"]
    models = stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10).models
    assert [m.model_id for m in models] == [MODEL] and sorted(models[0].workers) == sorted(
        u.address for u in suite["unets"]
    )
    assert (models[0].family, models[0].default_width) == ("sd15", 64)
    loras = stub.ListLoras(gateway_pb2.ListLorasRequest(family="sd15"), timeout=10).loras
    assert PEFT in [lora.lora_id for lora in loras] and {lora.family for lora in loras} == {"sd15"}
    controlnets = {
        c.controlnet_id: c for c in stub.ListControlNets(gateway_pb2.ListControlNetsRequest(), timeout=10).controlnets
    }
    assert controlnets[EDGES].loaded and sorted(controlnets[EDGES].workers) == sorted(
        c.address for c in suite["controlnets"]
    )
    assert controlnets["tiny-sdxl-cn-edges"].family == "sdxl" and not controlnets["tiny-sdxl-cn-edges"].loaded
    assert list(controlnets[EDGES].transports) == [common_pb2.RESIDUAL_TRANSPORT_SHARED_MEMORY]  # CPU workers
    with pytest.raises(grpc.RpcError) as error:
        stub.ListLoras(gateway_pb2.ListLorasRequest(family="sd3"), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "family" in error.value.details()
    # Reflection: grpcurl lists the gateway and describes its methods without proto files.
    reflection = reflection_pb2_grpc.ServerReflectionStub(rpc.create_channel(suite["gateway"].address))
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="swiftd.v1.Gateway"),
    ]
    listed, described = list(reflection.ServerReflectionInfo(iter(requests), timeout=10))
    assert {s.name for s in listed.list_services_response.service} >= {"swiftd.v1.Gateway", "grpc.health.v1.Health"}
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service if s.name == "Gateway" for m in s.method}
    assert methods >= {"Generate", "GenerateStream", "ListModels", "ListLoras", "ListControlNets"}


def test_cli_generates_through_the_gateway(suite, tmp_path, capsys):
    from swiftd.cli import main

    edges = tmp_path / "edges.png"
    edges.write_bytes(edge_image(64))
    out = tmp_path / "out.png"
    address = suite["gateway"].address
    rc = main(
        [
            "generate",
            "--address",
            address,
            "--model",
            MODEL,
            "--prompt",
            "a cat",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            "5",
            "--lora",
            f"{PEFT}:0.5",
            "--controlnet",
            f"{EDGES}={edges}:0.8",
            "-o",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and PIL.Image.open(out).size == (64, 64)
    assert "seed 5" in printed and "plan: unet" in printed and "denoise" in printed
    rc = main(["generate", "--address", address, "--prompt", "a cat", "--width", "63", "-o", str(out)])
    assert rc == 1 and "INVALID_ARGUMENT: params.width" in capsys.readouterr().err
    assert main(["models", "--address", address]) == 0 and MODEL in capsys.readouterr().out


# -- tracing ---------------------------------------------------------------------------------------


def test_one_trace_spans_all_four_services(suite):
    # A LoRA scale no earlier test used: the deltas must travel, so the trace shows the push.
    request = generate_request(loras=[(KOHYA_TE, 0.65)], controlnets=[(EDGES, 1.0)])
    response = suite["stub"].Generate(request, timeout=120)
    assert list(response.plan.pushed_lora_ids) == [KOHYA_TE]

    expected = {
        ("gateway", "/swiftd.v1.Gateway/Generate"),
        ("gateway", "validate"),
        ("gateway", "queue"),
        ("gateway", "plan"),
        ("gateway", "/swiftd.v1.LoraStore/PushLoras"),
        ("gateway", "/swiftd.v1.UNetWorker/DenoiseStream"),
        ("lora_store", "/swiftd.v1.LoraStore/PushLoras"),
        ("lora_store", "lora_store.prepare"),
        ("unet", "/swiftd.v1.UNetWorker/ReceiveLoraDeltas"),
        ("unet", "/swiftd.v1.UNetWorker/DenoiseStream"),
        ("unet", "text_encode"),
        ("unet", "lora_text_encoder"),
        ("unet", "controlnet_setup"),
        ("unet", "denoise"),
        ("unet", "lora_unet_patch"),
        ("unet", "vae_decode"),
        ("unet", "/swiftd.v1.ControlNetWorker/StreamResiduals"),
        ("controlnet", "/swiftd.v1.ControlNetWorker/StreamResiduals"),
        ("controlnet", "controlnet.session_start"),
    }

    def complete(spans):  # every process has exported its part
        ids = {s.span_id for s in spans}
        return (
            expected <= {(s.service, s.name) for s in spans}
            and all(not s.parent_id or s.parent_id in ids for s in spans)
            and sum(s.name == "controlnet.step" for s in spans) == STEPS
        )

    spans = suite["collector"].wait_for(response.trace_id, complete)
    by_id = {s.span_id: s for s in spans}
    assert {s.service for s in spans} == {"gateway", "unet", "controlnet", "lora_store"}
    roots = [s for s in spans if not s.parent_id]
    assert [(r.service, r.name) for r in roots] == [("gateway", "/swiftd.v1.Gateway/Generate")]
    assert all(s.parent_id in by_id for s in spans if s.parent_id), "a span's parent is missing from the trace"

    def named(service, name):
        found = [s for s in spans if s.service == service and s.name == name]
        assert found, f"no {name} span from {service}"
        return found

    def ancestors(span):
        while span.parent_id:
            span = by_id[span.parent_id]
            yield span

    plan_span = named("gateway", "plan")[0]
    assert plan_span.attributes["plan.unet_worker"] == response.plan.unet_worker
    assert plan_span.attributes["plan.pushed_lora_ids"] == [KOHYA_TE]
    for name in ("validate", "queue", "/swiftd.v1.LoraStore/PushLoras", "/swiftd.v1.UNetWorker/DenoiseStream"):
        named("gateway", name)

    # LoRA transfer: gateway -> store -> worker, in one chain.
    receive = named("unet", "/swiftd.v1.UNetWorker/ReceiveLoraDeltas")[0]
    assert ("lora_store", "/swiftd.v1.LoraStore/PushLoras") in [(a.service, a.name) for a in ancestors(receive)]
    assert named("lora_store", "lora_store.prepare")[0].attributes["lora.ids"] == [KOHYA_TE]

    # The worker's stages, with the patch step and one event per denoising step.
    for name in ("text_encode", "lora_text_encoder", "controlnet_setup", "vae_decode"):
        named("unet", name)
    denoise = named("unet", "denoise")[0]
    assert [e[1]["step"] for e in denoise.events if e[0] == "step"] == list(range(STEPS))
    patch = named("unet", "lora_unet_patch")[0]
    assert patch.attributes["lora.applied_at_step"] == response.lora_applied_at_step == 0
    assert patch.parent_id == denoise.span_id

    # ControlNet steps under the worker's residual stream, which hangs off the UNet's request.
    stream = named("controlnet", "/swiftd.v1.ControlNetWorker/StreamResiduals")[0]
    assert ("unet", "/swiftd.v1.UNetWorker/DenoiseStream") in [(a.service, a.name) for a in ancestors(stream)]
    steps = named("controlnet", "controlnet.step")
    assert sorted(s.attributes["step"] for s in steps) == list(range(STEPS))
    assert all(s.parent_id == stream.span_id for s in steps)
    named("controlnet", "controlnet.session_start")


def test_a_callers_trace_continues_into_the_suite(suite):
    """A user's service that traces its own work sees the suite's spans in the same trace."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from swiftd import tracing
    from swiftd.client import Client

    exporter = InMemorySpanExporter()
    tracing.setup_tracing("test-caller", SimpleSpanProcessor(exporter))
    with trace.get_tracer("test").start_as_current_span("user-request") as user_span:
        with Client(suite["gateway"].address) as client:
            result = client.generate(
                "a lighthouse at dusk", width=64, height=64, num_inference_steps=2, seed=3, model_id=MODEL
            )
    user_trace = format(user_span.get_span_context().trace_id, "032x")
    assert result.trace_id == user_trace
    client_span = next(s for s in exporter.get_finished_spans() if s.name == "/swiftd.v1.Gateway/Generate")
    assert client_span.parent.span_id == user_span.get_span_context().span_id

    spans = suite["collector"].wait_for(
        user_trace,
        lambda spans: {("gateway", "/swiftd.v1.Gateway/Generate"), ("unet", "vae_decode")}
        <= {(s.service, s.name) for s in spans},
    )
    gateway_server = next(s for s in spans if s.service == "gateway" and s.name == "/swiftd.v1.Gateway/Generate")
    assert gateway_server.parent_id == format(client_span.context.span_id, "016x")
    assert {"gateway", "unet"} <= {s.service for s in spans}
