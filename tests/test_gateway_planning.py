"""The gateway's placement rules and admission queue: on their own under synthetic load (no
processes), and once end to end through a real gateway (the placement and its reason in the
`started` event and the trace)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import pytest

from services.gateway.admission import AdmissionQueue
from services.gateway.planner import (
    CFG_SPLIT,
    PACK,
    SPREAD,
    ControlNetWorkerState,
    Demand,
    UNetWorkerState,
    assign_controlnets,
    choose_unet_worker,
    decide,
    plan_pb,
    remote_controlnet_workers,
    unet_workers,
)
from swiftd import device as devices
from swiftd import rpc
from swiftd.device import Device
from swiftd.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from swiftd.images import edge_image
from swiftd.launcher import start_controlnet, start_gateway, start_unet
from swiftd.request import LoraSet
from swiftd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.otlp_collector import InMemoryCollector

A = LoraSet.of([("papercut", 0.8)]).key
B = LoraSet.of([("watercolor", 1.0), ("papercut", 0.5)]).key


def worker(name, load=0, applied=(), cached=()):
    return UNetWorkerState(name, ["sd15"], tuple(applied), set(cached), load)


def test_affinity_first_while_it_has_a_free_slot_then_least_loaded():
    pick = lambda workers, want=A, slots=1: choose_unet_worker(workers, want, slots)  # noqa: E731
    # A free slot: the worker with the set applied wins, and says so.
    assert pick([worker("w0"), worker("w1", applied=A)]) == (worker("w1", applied=A), True)
    # Busy: the request does not wait for it while another worker is free.
    assert pick([worker("w0"), worker("w1", load=1, applied=A)]) == (worker("w0"), False)
    assert pick([worker("w0", load=1), worker("w1", load=1, applied=A)], slots=2)[0].address == "w1"
    # Everyone busy: least loaded, affinity only among equals.
    assert pick([worker("w0", load=1), worker("w1", load=2, applied=A)]) == (worker("w0", load=1), False)
    assert pick([worker("w0", load=1), worker("w1", load=1, applied=A)]) == (worker("w1", load=1, applied=A), True)
    # Same ids with another scale is another set.
    other_scale = LoraSet.of([("papercut", 0.7)]).key
    assert pick([worker("w0", load=0), worker("w1", applied=other_scale)], want=A)[0].address == "w0"


def test_ties_prefer_held_deltas_then_a_worker_without_another_set():
    # Nobody has B applied: the worker holding its deltas saves the transfer.
    held = worker("w1", cached=set(B))
    assert choose_unet_worker([worker("w0"), held], B, 1) == (held, False)
    # Then a pristine worker over one whose set other requests may want again.
    assert choose_unet_worker([worker("w0", applied=A), worker("w1")], B, 1)[0].address == "w1"
    # Requests without LoRAs: least loaded, then first listed.
    assert (
        choose_unet_worker([worker("w0", load=2), worker("w1", load=1), worker("w2", load=1)], (), 1)[0].address == "w1"
    )


def test_controlnets_spread_one_per_worker_preferring_loaded():
    hosts = {"edges": ["c0", "c1"], "depth": ["c0", "c1"], "pose": ["c1"]}
    loaded = {"c0": {"edges"}, "c1": {"depth"}}
    assert assign_controlnets(["edges", "depth"], hosts, loaded, Counter()) == ["c0", "c1"]
    assert assign_controlnets(["depth", "edges"], hosts, loaded, Counter()) == ["c1", "c0"]
    # More ControlNets than workers: they share, still balanced.
    assert Counter(assign_controlnets(["edges", "depth", "edges", "depth"], hosts, loaded, Counter())) == {
        "c0": 2,
        "c1": 2,
    }
    # Load from other requests breaks ties among equals.
    assert assign_controlnets(["edges"], {"edges": ["c0", "c1"]}, {}, Counter({"c0": 3})) == ["c1"]
    with pytest.raises(Unavailable, match="canny"):
        assign_controlnets(["canny"], hosts, loaded, Counter())


def test_admission_runs_capacity_then_queues_in_order():
    queue = AdmissionQueue(capacity=1, max_queue=2)
    assert list(queue.wait_turn(lambda: True, time.monotonic() + 5)) == []  # admitted at once
    seen: dict[str, list[int]] = {"a": [], "b": []}
    order = []

    def waiter(name):
        for position in queue.wait_turn(lambda: True, time.monotonic() + 10):
            seen[name].append(position)
        order.append(name)

    def until(condition):
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    threads = [threading.Thread(target=waiter, args=(n,)) for n in ("a", "b")]
    threads[0].start()
    until(lambda: queue.snapshot() == (1, 1))
    threads[1].start()
    until(lambda: queue.snapshot() == (1, 2))
    with pytest.raises(ResourceExhausted, match="queue full"):
        list(queue.wait_turn(lambda: True, time.monotonic() + 5))
    queue.release()  # the first request ends: a starts, b moves up
    until(lambda: order == ["a"] and seen["b"] == [1, 0])
    queue.release()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert order == ["a", "b"]
    assert seen == {"a": [0], "b": [1, 0]}
    assert queue.snapshot() == (1, 0)


def test_admission_cancel_and_deadline_leave_the_queue():
    queue = AdmissionQueue(capacity=1, max_queue=4)
    list(queue.wait_turn(lambda: True, time.monotonic() + 5))
    with pytest.raises(DeadlineExceeded):
        list(queue.wait_turn(lambda: True, time.monotonic() + 0.3))
    active = [True]
    with pytest.raises(Cancelled):
        for _ in queue.wait_turn(lambda: active[0], time.monotonic() + 5):
            active[0] = False
    assert queue.snapshot() == (1, 0)  # nobody left behind in the queue


# -- devices ---------------------------------------------------------------------------------------


def dev(text: str, host: str = "h") -> Device:
    return Device.of(host, text, "unused")


def test_workers_share_a_device_when_their_cores_or_gpu_coincide_on_one_host():
    assert dev("cpu:0").shares_with(dev("cpu:0-1")) and dev("cpu:0-3,8").shares_with(dev("cpu:8"))
    assert not dev("cpu:0").shares_with(dev("cpu:1"))
    assert dev("cpu").shares_with(dev("cpu:5"))  # unpinned: it may run on any core
    assert not dev("cpu:0").shares_with(dev("cpu:0", host="other"))
    assert dev("cuda:1").shares_with(dev("cuda:1")) and not dev("cuda:0").shares_with(dev("cuda:1"))
    assert not dev("cuda:0").shares_with(dev("cpu:0"))
    # A worker that reports nothing is alone on its own device.
    assert not Device.of("h", "", "a:1").shares_with(Device.of("h", "", "a:2"))
    assert devices.format_cores({0, 1, 2, 3, 8}) == "0-3,8"


def test_a_gpu_is_named_by_its_uuid_else_its_physical_index(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert devices.local_device("cuda:1") == "cuda:3" and devices.local_device("cuda") == "cuda:2"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert devices.local_device("cuda:1") == "cuda:1"
    # Where the driver tells the UUID (here as it would for two containers of one pod, each given
    # its own GPU by the device plugin, each seeing it as cuda:0): the same name, two devices.
    for pod_container_gpu in ("GPU-5c1f", "GPU-77ab"):
        monkeypatch.setattr(devices, "gpu_uuid", lambda index, uuid=pod_container_gpu: uuid if index == 0 else None)
        assert devices.local_device("cuda") == devices.local_device("cuda:0") == f"cuda:{pod_container_gpu}"
    assert not dev("cuda:GPU-5c1f", host="pod").shares_with(dev("cuda:GPU-77ab", host="pod"))
    assert dev("cuda:GPU-5c1f", host="pod").shares_with(dev("cuda:GPU-5c1f", host="pod"))


# -- placement under load --------------------------------------------------------------------------

CN = "edges"


def unet(name, core, load=0, local=(CN,), applied=()):
    return UNetWorkerState(name, ["sd15"], tuple(applied), set(), load, 1, dev(f"cpu:{core}"), frozenset(local))


def cn_worker(name, core, load=0):
    return ControlNetWorkerState(name, frozenset([CN, "depth"]), frozenset([CN]), load, dev(f"cpu:{core}"))


def bench_machine(u0=0, u1=0, c0=0, c1=0, local=(CN,)):
    """The traffic bench's deployment on 2 cores: per core a UNet worker and a ControlNet worker."""
    return [unet("u0", 0, u0, local), unet("u1", 1, u1, local)], [cn_worker("c0", 0, c0), cn_worker("c1", 1, c1)]


def test_idle_machine_splits_classifier_free_guidance_over_two_devices():
    unets, cns = bench_machine()
    decision = decide(Demand(controlnet_ids=(CN,)), unets, cns, slots=1)
    assert decision.placement == CFG_SPLIT and "2 idle devices" in decision.reason
    assert {decision.main.worker.address, decision.partner.worker.address} == {"u0", "u1"}
    assert decision.main.controlnet_workers == decision.partner.controlnet_workers == [""]  # in-process, each half
    plan = plan_pb(decision, LoraSet(), [CN])
    assert plan.placement == gateway_pb2.PLACEMENT_CFG_SPLIT and plan.reason == decision.reason
    assert unet_workers(plan) == ["u0", "u1"] and remote_controlnet_workers(plan) == []


def test_idle_device_without_a_split_spreads_controlnets_there_not_beside_the_unet():
    unets, cns = bench_machine()
    for demand, allow, why in [
        (Demand(controlnet_ids=(CN,)), False, "--cfg-split never"),
        (Demand(controlnet_ids=(CN,), cfg=False), True, "no classifier-free guidance"),
    ]:
        decision = decide(demand, unets, cns, slots=1, allow_cfg_split=allow)
        assert decision.placement == SPREAD and why in decision.reason
        # The UNet on core 0, its ControlNet on the other core's worker, not c0 beside it.
        assert decision.main.worker.address == "u0" and decision.main.controlnet_workers == ["c1"]
        assert "idle device cpu:1" in decision.reason


def test_one_busy_device_packs_the_next_request_on_the_idle_one():
    # u1 runs a request: core 1 is busy, its ControlNet worker c1 with it.
    unets, cns = bench_machine(u1=1)
    decision = decide(Demand(controlnet_ids=(CN,)), unets, cns, slots=1)
    assert decision.placement == PACK and decision.main.worker.address == "u0"
    assert decision.main.controlnet_workers == [""]
    assert "no other device idle" in decision.reason and "fewer than 2 idle devices" in decision.reason
    # A ControlNet session on c0 (another request spread there) makes core 0 just as busy, and
    # steers the UNet choice to the worker whose device carries no other work.
    unets, cns = bench_machine(c0=1)
    decision = decide(Demand(controlnet_ids=(CN,)), unets, cns, slots=1)
    assert decision.placement == PACK and decision.main.worker.address == "u1"


def test_every_device_busy_packs_on_the_least_loaded_worker():
    unets, cns = bench_machine(u0=2, u1=1, local=(CN, "depth"))
    decision = decide(Demand(controlnet_ids=(CN, "depth"), loras=A), unets, cns, slots=1)
    assert decision.placement == PACK and decision.main.worker.address == "u1"
    assert decision.main.controlnet_workers == ["", ""]
    # Without ControlNets nothing is spread either.
    assert decide(Demand(), unets, cns, slots=1).placement == PACK


def test_controlnets_a_unet_worker_cannot_run_go_to_a_controlnet_worker_even_when_busy():
    unets, cns = bench_machine(u0=1, u1=1, c0=1, c1=1, local=())
    decision = decide(Demand(controlnet_ids=(CN,)), unets, cns, slots=1)
    assert decision.placement == SPREAD and "cannot run edges in-process" in decision.reason
    assert decision.main.controlnet_workers[0] in ("c0", "c1")
    # Nor is a request split over workers that would need ControlNet workers for it.
    idle_unets, idle_cns = bench_machine(local=())
    decision = decide(Demand(controlnet_ids=(CN,)), idle_unets, idle_cns, slots=1)
    assert decision.placement == SPREAD and "cannot all run the request's ControlNets" in decision.reason


def test_workers_on_one_device_count_as_one_device():
    # test_gateway's layout: both UNet workers on core 0, both ControlNet workers on core 1.
    unets = [unet("u0", 0), unet("u1", 0)]
    cns = [cn_worker("c0", 1), cn_worker("c1", 1)]
    decision = decide(Demand(controlnet_ids=(CN, "depth")), unets, cns, slots=1)
    assert decision.placement == SPREAD and "fewer than 2 idle devices" in decision.reason
    assert sorted(decision.main.controlnet_workers) == ["c0", "c1"]  # one per worker, both on core 1
    # A running request on u0 makes u1's device busy too: the next one is packed.
    unets[0].load = 1
    cns_busy = [cn_worker("c0", 1, load=1), cn_worker("c1", 1)]
    decision = decide(Demand(controlnet_ids=(CN,)), unets, cns_busy, slots=1)
    assert decision.placement == PACK and decision.main.worker.address == "u1"


def test_workers_that_report_no_device_are_each_a_device_of_their_own():
    unets = [UNetWorkerState("u0", ["sd15"], (), set(), 0, local_controlnets=frozenset([CN]))]
    cns = [ControlNetWorkerState("c0", frozenset([CN]))]
    decision = decide(Demand(controlnet_ids=(CN,)), unets, cns, slots=1)
    assert decision.placement == SPREAD and decision.main.controlnet_workers == ["c0"]
    cns[0].load = 1
    assert decide(Demand(controlnet_ids=(CN,)), unets, cns, slots=1).placement == PACK


def test_controlnets_go_where_their_residuals_can_share_memory_with_the_unet_worker():
    # Two GPU pods, each a UNet worker on one GPU and a ControlNet worker on another, sharing
    # /dev/shm within the pod (host identity m0, m1). Pod 0's UNet is busy, so pod 1's runs the
    # request: its own pod's ControlNet worker, not pod 0's (listed first, as idle), whose
    # residuals would cross the network as bytes.
    def gpu(pod: int, index: int) -> Device:
        return Device.of(f"pod{pod}", f"cuda:{index}", "unused", memory=f"m{pod}")

    unets = [UNetWorkerState(f"u{pod}", ["sdxl"], (), set(), load=1 - pod, device=gpu(pod, 0)) for pod in (0, 1)]
    cns = [ControlNetWorkerState(f"c{pod}", frozenset([CN]), frozenset([CN]), device=gpu(pod, 1)) for pod in (0, 1)]
    decision = decide(Demand(controlnet_ids=(CN,)), unets, cns, slots=1)
    assert decision.placement == SPREAD and decision.main.worker.address == "u1"
    assert decision.main.controlnet_workers == ["c1"]
    # Two ControlNets: one device each comes first, the UNet's own pod first among them.
    decision = decide(Demand(controlnet_ids=(CN, CN)), unets, cns, slots=1)
    assert decision.main.controlnet_workers == ["c1", "c0"]
    # Workers that report no memory domain share none.
    assert not Device.of("h", "cpu:0", "a").shares_memory_with(Device.of("h", "cpu:1", "b"))
    assert dev("cpu:0").shares_memory_with(dev("cpu:1")) is False


def test_a_split_pushes_the_lora_set_to_each_half_that_lacks_it():
    unets, cns = bench_machine()
    unets[0].applied = A  # u0 has the set: it leads (affinity), u1 gets the push
    decision = decide(Demand(loras=A), unets, cns, slots=1)
    plan = plan_pb(decision, LoraSet.of([("papercut", 0.8)]), [])
    assert plan.placement == gateway_pb2.PLACEMENT_CFG_SPLIT and plan.unet_worker == "u0"
    assert plan.lora_set_already_applied and not plan.pushed_lora_ids
    assert not plan.cfg_partner.lora_set_already_applied and list(plan.cfg_partner.pushed_lora_ids) == ["papercut"]


# -- end to end: the placement in `started`, the response and the trace ----------------------------

MODEL, EDGES = "tiny-sd15", "tiny-sd15-cn-edges"


@pytest.fixture(scope="module")
def bench_like_suite(zoo_root, tmp_path_factory):
    """Two UNet workers on cores 0 and 1 and a ControlNet worker on core 1, CFG split off (and on
    core 1 too, a ControlNet worker that cannot share memory with them)."""
    collector = InMemoryCollector().start()
    cores = [0, 1 % os.cpu_count()]
    unets = [
        start_unet(
            zoo_root,
            MODEL,
            cpu_cores=[c],
            num_threads=1,
            env=collector.env,
            wait=False,
            extra_args=["--max-steps", "1000"],
        )
        for c in cores
    ]
    controlnet = start_controlnet(
        zoo_root, preload=[EDGES], cpu_cores=[cores[1]], num_threads=1, env=collector.env, wait=False
    )
    # One that shares no memory with the UNet workers (as on another host: its residuals would
    # cross as bytes), listed first: the gateway must prefer the other.
    elsewhere = {**collector.env, "SWIFTD_SHM_DIR": str(tmp_path_factory.mktemp("no-shm") / "absent")}
    far = start_controlnet(zoo_root, preload=[EDGES], cpu_cores=[cores[1]], num_threads=1, env=elsewhere, wait=False)
    for service in (*unets, controlnet, far):
        service.wait_ready()
    gateway = start_gateway(
        [u.address for u in unets],
        [far.address, controlnet.address],
        extra_args=["--cfg-split", "never", "--max-steps", "1000"],
        env=collector.env,
    )
    channel = rpc.create_channel(gateway.address)
    yield gateway_pb2_grpc.GatewayStub(channel), unets, controlnet, collector
    channel.close()
    for service in (gateway, *unets, controlnet, far):
        service.stop()
    collector.stop()


def generate_request(steps=2, controlnet=True) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        params=common_pb2.GenerationParams(
            prompt="a lighthouse",
            width=64,
            height=64,
            num_inference_steps=steps,
            seed=3,
            scheduler=common_pb2.SCHEDULER_EULER,  # takes 1000 steps (the model's PNDM cannot)
            model_id=MODEL,
        ),
        controlnets=[common_pb2.ControlNetInput(controlnet_id=EDGES, image=edge_image(64))] if controlnet else [],
    )


def started_plan(stream) -> gateway_pb2.Plan:
    return next(e.started.plan for e in stream if e.HasField("started"))


def as_started(final_plan: gateway_pb2.Plan) -> gateway_pb2.Plan:
    """The final plan less what only the run told: how each ControlNet's residuals travelled."""
    plan = gateway_pb2.Plan()
    plan.CopyFrom(final_plan)
    for assignment in plan.controlnets:
        assignment.transport = common_pb2.RESIDUAL_TRANSPORT_UNSPECIFIED
    return plan


def test_started_event_and_trace_carry_the_placement_and_its_reason(bench_like_suite):
    stub, unets, controlnet, collector = bench_like_suite
    # Idle: the UNet on core 0, the ControlNet on the ControlNet worker of idle core 1 that shares
    # memory with it.
    events = list(stub.GenerateStream(generate_request(), timeout=120))
    plan = started_plan(iter(events))
    assert plan.placement == gateway_pb2.PLACEMENT_SPREAD, plan.reason
    assert plan.unet_worker == unets[0].address and [a.worker for a in plan.controlnets] == [controlnet.address]
    assert "idle device cpu:1" in plan.reason and "--cfg-split never" in plan.reason
    final = events[-1].final
    assert as_started(final.plan) == plan and final.image_png
    # The worker on the other core is on this host: its residuals crossed shared memory.
    assert [a.transport for a in final.plan.controlnets] == [common_pb2.RESIDUAL_TRANSPORT_SHARED_MEMORY]

    spans = collector.wait_for(final.trace_id, lambda spans: any(s.name == "plan" for s in spans))
    plan_span = next(s for s in spans if s.service == "gateway" and s.name == "plan")
    assert plan_span.attributes["plan.placement"] == "spread"
    assert plan_span.attributes["plan.reason"] == plan.reason

    # Core 0 busy with a long request: core 1's ControlNet worker shares the only idle UNet
    # worker's device, so the next request packs its ControlNet beside that UNet.
    long = stub.GenerateStream(generate_request(steps=1000, controlnet=False), timeout=120)
    try:
        assert started_plan(long).unet_worker == unets[0].address
        events = list(stub.GenerateStream(generate_request(), timeout=120))
        plan = started_plan(iter(events))
        assert plan.placement == gateway_pb2.PLACEMENT_PACK, plan.reason
        assert plan.unet_worker == unets[1].address and [a.worker for a in plan.controlnets] == [""]
        assert "no other device idle" in plan.reason
        assert as_started(events[-1].final.plan) == plan and events[-1].final.image_png
    finally:
        long.cancel()
