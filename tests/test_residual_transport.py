"""The residual data plane (swiftd/transport): a shared-memory ring never hands out a half-written
or overwritten step, leaves nothing in /dev/shm once mapped or after a crash; residuals computed
straight into a slot are the same numbers; the step socket carries whole messages and ends with its
peer; and a UNet worker that cannot map a ring it was offered gets inline bytes instead, with the
same latents, bit for bit."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from services.unet.addons import controlnet_stream
from swiftd import codec, rpc, transport
from swiftd.controlnet_step import ControlNetSession, ControlNetStepper
from swiftd.launcher import start_controlnet, start_unet
from swiftd.loading import load_controlnet
from swiftd.request import ControlNet
from swiftd.transport import shm
from swiftd.transport.idle import IdleRings
from swiftd.transport.shm import ShmRing, TornRead
from swiftd.transport.step_socket import StepListener, StepSocket
from swiftd.v1 import common_pb2, controlnet_pb2, controlnet_pb2_grpc, unet_pb2, unet_pb2_grpc
from tests.reference import SIZE, STEPS, conditioning_image
from tests.test_controlnet_service import denoise_request
from tests.test_metrics import METRICS, moved, scrape

pytestmark = pytest.mark.skipif(not transport.host_identity(), reason="no /dev/shm on this machine")

MODEL = "tiny-sd15"
CN = f"{MODEL}-cn-edges"
CPU = torch.device("cpu")


def residuals(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 8, 16, 16, generator=generator), torch.randn(2, 16, 8, 8, generator=generator)]


def test_a_ring_hands_out_exactly_the_step_it_announced():
    writer = ShmRing.create(residuals(0), torch.float16)
    reader = ShmRing.attach(writer.to_pb())
    try:
        first = writer.write(residuals(1))
        got = reader.read(first, CPU, torch.float32)
        assert all(torch.equal(g, r.half().float()) for g, r in zip(got, residuals(1)))  # cast once, to fp16
        writer.write(residuals(2))
        writer.write(residuals(3))  # the ring (two slots) came round: step 1's slot holds step 3
        with pytest.raises(TornRead, match="holds step 3, not 1"):
            reader.read(first, CPU, torch.float32)
        being_written = writer.write(residuals(4))
        writer._header[being_written.index] = 0  # as while the writer fills it
        with pytest.raises(TornRead):
            reader.read(being_written, CPU, torch.float32)
        with pytest.raises(TornRead, match="out of range"):
            reader.read(controlnet_pb2.ResidualSlot(index=7, sequence=1), CPU, torch.float32)
    finally:
        reader.close()
        writer.close()


def test_step_samples_cross_the_ring_the_other_way_and_a_stale_or_torn_one_is_never_read():
    """The UNet worker writes each step's sample into the ring's sample buffer; the ControlNet
    worker reads exactly that step's, or fails (never a stale or half-written sample); a sample the
    buffer was not planned for goes as bytes."""
    sample = torch.randn(2, 4, 8, 8)
    writer = ShmRing.create(residuals(0), None, sample=sample)  # the ControlNet worker's
    reader = ShmRing.attach(writer.to_pb())  # the UNet worker's
    try:
        for step_index in (1, 2):
            sent = torch.randn(2, 4, 8, 8)
            assert reader.write_sample(sent, step_index)
            got = writer.read_sample(step_index)
            assert torch.equal(got, sent)
            sent.add_(1.0)
            assert not torch.equal(got, sent)  # a copy: the next write cannot change what was read
        with pytest.raises(TornRead, match="holds step 2, not 3"):
            writer.read_sample(3)  # announced, but the buffer still holds the last step's
        reader._header[reader.slots] = 0  # as while the UNet worker writes it
        with pytest.raises(TornRead):
            writer.read_sample(2)
        assert not reader.write_sample(torch.randn(1, 4, 8, 8), 3)  # another shape: as bytes
        assert not reader.write_sample(torch.randn(2, 4, 8, 8, dtype=torch.float64), 3)  # another dtype
    finally:
        reader.close()
        writer.close()
    without = ShmRing.create(residuals(0), None)  # offered before any sample was seen
    reader = ShmRing.attach(without.to_pb())
    try:
        assert not reader.write_sample(sample, 1)
    finally:
        reader.close()
        without.close()


def test_a_ring_leaves_nothing_in_shared_memory_once_mapped_or_when_its_writer_died():
    writer = ShmRing.create(residuals(0), None)
    path = transport.SHM_DIR / writer.name
    assert path.exists()
    reader = ShmRing.attach(writer.to_pb())
    assert not path.exists()  # both sides map it: the name is not needed any more
    slot = writer.write(residuals(5))
    assert all(torch.equal(g, r) for g, r in zip(reader.read(slot, CPU, torch.float32), residuals(5)))
    reader.close()
    writer.close()
    # A writer killed before any reader mapped its ring: removed by the next worker's start-up scan.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = transport.SHM_DIR / f"{shm.PREFIX}{int(dead.stdout)}-0123456789abcdef"
    abandoned_socket = transport.SHM_DIR / f"{shm.PREFIX}{int(dead.stdout)}-0123456789abcdef.sock"
    alive = transport.SHM_DIR / shm.fresh_name()  # ours: in use
    # A live process with the dead writer's pid (a restarted container's worker is pid 1 again):
    # its start time differs from the one in the name.
    reused = transport.SHM_DIR / f"{shm.PREFIX}{os.getpid()}.1-0123456789abcdef"
    for leftover in (abandoned, abandoned_socket, alive, reused):
        leftover.write_bytes(b"\0" * 64)
    try:
        assert {abandoned.name, abandoned_socket.name, reused.name} <= set(shm.remove_abandoned())
        assert not abandoned.exists() and not abandoned_socket.exists() and not reused.exists()
        assert alive.exists() and f"{shm.PREFIX}{os.getpid()}." in alive.name
    finally:
        alive.unlink(missing_ok=True)


def test_residuals_computed_into_a_slot_are_the_numbers_computed_apart(zoo_root):
    stepper = ControlNetStepper(load_controlnet(zoo_root / "controlnets" / CN, torch.float32, "cpu"))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, stepper.controlnet.config.cross_attention_dim, generator=generator)
    embedding = stepper.embed_condition(torch.rand(2, 3, 64, 64, generator=generator))
    for guess_mode in (False, True):
        apart = stepper.step(sample, torch.tensor(500.0), hidden, embedding, 0.7, guess_mode)
        apart = [*apart.down_block_res_samples, apart.mid_block_res_sample]
        for wire in (None, torch.float16):  # fp32 slots, and fp16 ones (one cast, as inline fp16 bytes)
            writer = ShmRing.create(apart, wire)
            reader = ShmRing.attach(writer.to_pb())
            try:
                slot = writer.next_slot()
                stepper.step(sample, torch.tensor(500.0), hidden, embedding, 0.7, guess_mode, out=slot)
                got = reader.read(writer.commit(), CPU, wire or torch.float32)
                assert all(torch.equal(g, a.to(wire or torch.float32)) for g, a in zip(got, apart))
            finally:
                reader.close()
                writer.close()


def test_step_messages_cross_a_socket_that_leaves_nothing_behind_and_ends_with_its_peer():
    listener = StepListener()
    path = transport.SHM_DIR / listener.name
    assert path.exists()
    reader = StepSocket.connect(listener.name)
    assert not path.exists()  # connected: the name is not needed any more
    writer = listener.accept(timeout=5)
    listener.close()
    try:
        step = controlnet_pb2.StepInput(step_index=3, timestep=981.0, sample=codec.tensor_to_proto(residuals(1)[0]))
        reader.send(step)
        assert writer.receive(controlnet_pb2.StepInput, timeout=5) == step
        with pytest.raises(TimeoutError):
            writer.receive(controlnet_pb2.StepInput, timeout=0.05)
        writer.send(
            controlnet_pb2.ResidualsResponse(step_index=3, slot=controlnet_pb2.ResidualSlot(index=1, sequence=4))
        )
        assert reader.receive(controlnet_pb2.ResidualsResponse, timeout=5).slot.sequence == 4
        # A message that arrives in parts, the rest later than the wait for one to begin: read
        # whole, not cut at the timeout (which would leave every later message misframed).
        payload = step.SerializeToString()
        framed = len(payload).to_bytes(4, "little") + payload
        reader._sock.sendall(framed[:3])
        threading.Timer(0.3, reader._sock.sendall, [framed[3:]]).start()
        assert writer.receive(controlnet_pb2.StepInput, timeout=0.05) == step
        reader.send(step)
        assert writer.receive(controlnet_pb2.StepInput, timeout=5) == step
        reader._sock.sendall((1 << 30).to_bytes(4, "little"))  # a length no step message has
        with pytest.raises(ValueError, match="bytes"):
            writer.receive(controlnet_pb2.StepInput, timeout=5)
        reader.close()  # the peer ends the session, or dies: the other end reads the end at once
        assert writer.receive(controlnet_pb2.StepInput, timeout=5) is None
    finally:
        reader.close()
        writer.close()


def mapped(ring: ShmRing) -> bool:
    """Whether this process still maps the ring's memory (its name is gone once both sides map it)."""
    return ring.name in Path("/proc/self/maps").read_text()


def test_idle_rings_hand_each_ring_out_once_and_let_go_of_the_oldest_and_of_those_idle_too_long():
    rings = [ShmRing.create(residuals(i), None) for i in range(3)]
    idle = IdleRings(max_idle=2, idle_s=0.5)
    for ring in rings:
        idle.put(ring)
    assert idle.names() == [rings[1].name, rings[2].name]
    assert not mapped(rings[0])  # beyond max_idle: the oldest was closed
    assert idle.take(rings[1].name) is rings[1] and idle.take(rings[1].name) is None  # once
    assert idle.take_first(["unknown", rings[2].name], lambda ring: False) is None  # does not fit
    assert idle.take_first(["unknown", rings[2].name], lambda ring: True) is rings[2]
    idle.put(rings[2], "worker-a")
    idle.put(rings[1], "worker-a")
    assert idle.take_all("worker-b") == [] and idle.take_all("worker-a", limit=1) == [rings[1]]  # newest first
    idle.put(rings[2], "worker-a")
    time.sleep(1.0)  # idle for longer than idle_s: closed by the sweeper, with nobody asking
    assert not mapped(rings[2]) and len(idle) == 0
    assert mapped(rings[1])  # handed out: not the store's to close
    rings[1].close()


def test_a_kept_ring_is_offered_again_only_for_residuals_and_samples_it_was_planned_for():
    tensors, sample = residuals(0), torch.zeros(2, 4, 8, 8)
    writer = ShmRing.create(tensors, None, sample=sample)
    reader = ShmRing.attach(writer.to_pb())
    try:
        assert writer.serves(residuals(1), None, sample)  # other values, the same plan
        assert not writer.serves(residuals(1), torch.float16, sample)  # another wire dtype
        assert not writer.serves([t[:1] for t in tensors], None, sample[:1])  # another batch
        assert not writer.serves(tensors, None, None)  # no sample buffer wanted
        assert reader.is_offered_as(writer.to_pb())
        other = ShmRing.create(residuals(1), None, sample=sample)
        assert not reader.is_offered_as(other.to_pb())  # another ring (name)
        other.close()
        # A new session on the kept ring: sequence numbers run on, no slot holds a step yet.
        slot = writer.write(tensors)
        writer.reuse(tensors)
        with pytest.raises(TornRead):
            reader.read(slot, CPU, torch.float32)
        slot = writer.write(residuals(2))
        assert slot.sequence == 2 and torch.equal(reader.read(slot, CPU, torch.float32)[1], residuals(2)[1])
    finally:
        reader.close()
        writer.close()


@pytest.fixture(scope="module")
def workers(zoo_root, tmp_path_factory):
    """A UNet worker and two ControlNet workers on this host: one shares /dev/shm with it, the
    other keeps its rings in another folder of the same tmpfs (so it offers one the UNet worker
    cannot open: a misconfigured pod, or files the UNet worker's user may not read)."""
    elsewhere = transport.SHM_DIR / f"swiftd-test-{os.getpid()}"
    elsewhere.mkdir()
    services = {
        "unet": start_unet(zoo_root, MODEL, num_threads=1, extra_args=["--max-steps", "1000"], wait=False),
        "shared": start_controlnet(zoo_root, [CN], num_threads=1, extra_args=METRICS, wait=False),
        "apart": start_controlnet(
            zoo_root, [CN], num_threads=1, extra_args=METRICS, env={"SWIFTD_SHM_DIR": str(elsewhere)}, wait=False
        ),
    }
    try:
        for service in services.values():
            service.wait_ready()
        yield services, elsewhere
    finally:
        for service in services.values():
            service.stop()
        for leftover in elsewhere.iterdir():
            leftover.unlink()
        elsewhere.rmdir()


def test_a_ring_the_unet_worker_cannot_map_falls_back_to_inline_bytes_with_the_same_latents(workers):
    """And where the ring is mapped, the steps after the offer and its answer send their samples
    through it and get their residuals computed straight into its slots (the same latents prove
    both arrived intact)."""
    services, elsewhere = workers
    before = {w: scrape(services[w].metrics_address) for w in ("shared", "apart")}
    controlnets = [ControlNet(CN, conditioning_image(0), 1.0, 0.0, 1.0)]
    stub = unet_pb2_grpc.UNetWorkerStub(rpc.create_channel(services["unet"].address))

    def run(worker: str) -> unet_pb2.DenoiseResponse:
        request = denoise_request(MODEL, controlnets, [services[worker].address], 7.5)
        return stub.Denoise(request, timeout=120)

    shared, apart = run("shared"), run("apart")
    assert list(shared.controlnet_transports) == [common_pb2.RESIDUAL_TRANSPORT_SHARED_MEMORY]
    assert list(apart.controlnet_transports) == [common_pb2.RESIDUAL_TRANSPORT_INLINE]
    assert torch.equal(codec.tensor_from_proto(shared.latents), codec.tensor_from_proto(apart.latents))
    after = {w: scrape(services[w].metrics_address) for w in before}

    def steps(worker: str, sample: str, residuals: str) -> float:
        return moved(before[worker], after[worker], "swiftd_controlnet_steps_total", sample=sample, residuals=residuals)

    # Step 0 (the ring's offer) copies its residuals into the slot offered; step 1 (the answer)
    # carries its sample as bytes; every later step's sample comes through the ring, and every
    # step from the answer on computes its residuals straight into a slot.
    assert steps("shared", "bytes", "copied") == 1 and steps("shared", "bytes", "in_place") == 1
    assert steps("shared", "ring", "in_place") == STEPS - 2
    # The ring it offered with step 0 could not be mapped: that step again, and the rest, inline.
    assert steps("apart", "bytes", "copied") == 1 and steps("apart", "bytes", "bytes") == STEPS
    assert any("cannot map its shared_memory ring" in line for line in services["unet"].log_lines)
    assert not list(elsewhere.iterdir())  # the declined ring was removed by its writer
    listing = controlnet_pb2_grpc.ControlNetWorkerStub(rpc.create_channel(services["shared"].address)).ListControlNets(
        controlnet_pb2.ControlNetWorkerListControlNetsRequest(), timeout=10
    )
    assert common_pb2.RESIDUAL_TRANSPORT_SHARED_MEMORY in listing.controlnets[0].transports


def rings_offered(before: dict, after: dict) -> dict[str, float]:
    """Shared-memory rings a ControlNet worker offered between two scrapes: new, and reused."""
    kinds = ("new", "reused")
    return {k: moved(before, after, "swiftd_residual_rings_total", transport="shared_memory", ring=k) for k in kinds}


def test_the_next_request_of_the_same_workers_reuses_the_ring_of_the_last_one(workers):
    """A ring costs its session more than a step does (reserved, mapped, page-locked with GPU
    tensors): a session that got every step keeps it on both sides, and the next request's session
    with the same workers is offered it again, with the same latents; one of another size gets a
    ring of its own and leaves the kept one be."""
    services, _ = workers
    stub = unet_pb2_grpc.UNetWorkerStub(rpc.create_channel(services["unet"].address))
    controlnets = [ControlNet(CN, conditioning_image(0), 1.0, 0.0, 1.0)]

    def run(size: int = SIZE) -> tuple[unet_pb2.DenoiseResponse, dict]:
        before = scrape(services["shared"].metrics_address)
        request = denoise_request(MODEL, controlnets, [services["shared"].address], 7.5)
        request.params.width = request.params.height = size
        response = stub.Denoise(request, timeout=120)
        assert list(response.controlnet_transports) == [common_pb2.RESIDUAL_TRANSPORT_SHARED_MEMORY]
        return response, rings_offered(before, scrape(services["shared"].metrics_address))

    first, _ = run()
    second, rings = run()
    assert rings == {"new": 0, "reused": 1}
    assert torch.equal(codec.tensor_from_proto(first.latents), codec.tensor_from_proto(second.latents))
    _, rings = run(SIZE * 2)
    assert rings == {"new": 1, "reused": 0}
    _, rings = run()
    assert rings == {"new": 0, "reused": 1}


def test_a_ring_is_kept_only_for_a_session_that_got_every_step_and_once_whatever_closes_it(workers):
    """This process as the UNet worker's reader, against the real ControlNet worker: a session of
    one step (the ring offered, never answered) keeps nothing; a full one keeps its ring once,
    however often it is closed (a request that fails after its ControlNets finished closes them
    again), and the next session gets the same residuals through it."""
    services, _ = workers
    address = services["shared"].address
    for ring in controlnet_stream.IDLE_RINGS.take_all(address):  # this test's own start
        ring.close()
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=generator)
    session = ControlNetSession(
        CN,
        torch.rand(1, 3, SIZE, SIZE, generator=generator),
        torch.randn(2, 77, 32, generator=generator),
        None,
        None,
        1.0,
        False,
    )

    def run(steps: int) -> tuple[list[torch.Tensor], dict]:
        before = scrape(services["shared"].metrics_address)
        with rpc.create_channel(address) as channel:
            source = controlnet_stream.RemoteResidualSource(
                channel, address, session, "", "kept-once", 60.0, 30.0, torch.float32, CPU, (transport.SHARED_MEMORY,)
            )
            out = []
            for i in range(steps):
                source.start_step(i, torch.tensor(999.0 - 10 * i), sample)
                got = source.wait_step()
                out += [t.clone() for t in (*got.down_block_res_samples, got.mid_block_res_sample)]
            source.close()
            source.close()
        return out, rings_offered(before, scrape(services["shared"].metrics_address))

    run(1)
    assert controlnet_stream.IDLE_RINGS.take_all(address) == []  # never answered: not kept
    first, rings = run(4)
    assert rings == {"new": 1, "reused": 0}
    second, rings = run(4)
    assert rings == {"new": 0, "reused": 1}
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    for ring in controlnet_stream.IDLE_RINGS.take_all(address):
        ring.close()


def test_cuda_ipc_is_chosen_only_for_a_unet_worker_that_can_map_the_controlnet_workers_gpu():
    """With one GPU per container, or a PID namespace per container, the UNet worker cannot map
    memory on the ControlNet worker's GPU: the ControlNet worker picks shared memory then (a copy
    through host memory on each side), not CUDA IPC that would be declined and end in bytes
    through the stream."""
    offered, accepted = (transport.CUDA_IPC, transport.SHARED_MEMORY), transport.parse(transport.DEFAULT)
    here = transport.Peer(transport.host_identity(), ("GPU-a", "GPU-b"), transport.pid_namespace())

    def choose(device_type, gpu, **peer):
        return transport.choose(offered, dataclasses.replace(here, **peer), accepted, device_type, gpu)

    assert choose("cuda", "GPU-b") == transport.CUDA_IPC
    assert choose("cuda", "GPU-b", gpus=("GPU-a",)) == transport.SHARED_MEMORY
    assert choose("cuda", "GPU-b", pid_namespace="pid:[1]") == transport.SHARED_MEMORY
    # Unknown on either side (an older UNet worker, a driver that gives no UUID): assumed to fit,
    # and declined by the UNet worker if it does not.
    assert choose("cuda", "GPU-b", gpus=(), pid_namespace="") == choose("cuda", None) == transport.CUDA_IPC
    assert choose("cpu", None) == transport.SHARED_MEMORY
    assert choose("cuda", "GPU-b", host_identity="another host") == transport.INLINE
    start = controlnet_pb2.SessionStart(host_identity="h", gpu_uuids=["GPU-a"], pid_namespace="pid:[2]")
    assert transport.Peer.from_pb(start) == transport.Peer("h", ("GPU-a",), "pid:[2]")


def test_a_cuda_ring_names_its_gpu_by_uuid_and_one_this_process_cannot_see_is_declined():
    """Two workers may number one GPU differently (CUDA_VISIBLE_DEVICES per container): the
    reader maps a CUDA IPC ring on its own index of the writer's GPU, found by UUID, and declines
    a ring on a GPU it cannot see (here: none), so the stream takes another transport."""
    from swiftd.transport.cuda_ipc import gpu_uuid, local_index

    visible = [gpu_uuid(i) for i in range(torch.cuda.device_count())]
    for index, uuid in enumerate(visible):
        assert local_index(uuid, 7) == index
    with pytest.raises(RuntimeError, match="not visible"):
        local_index("GPU-00000000-0000-0000-0000-000000000000", 0)
    assert local_index(None, 1) == 1  # a writer that could not tell its GPU's UUID


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU (runs on a lent GPU machine)")
def test_cuda_ipc_residuals_equal_inline_ones_on_a_gpu(zoo_root):
    """UNet and ControlNet workers on one GPU negotiate CUDA IPC; the latents equal those of the
    same request with its residuals as inline bytes (fp32 on the wire), bit for bit, and those of
    a ControlNet worker that takes shared memory (the transport for a GPU the UNet worker cannot
    see: GPU tensors through a host-memory ring)."""
    device = ["--device", "cuda"]
    services = {
        "unet": start_unet(zoo_root, MODEL, num_threads=1, extra_args=device, wait=False),
        "ipc": start_controlnet(zoo_root, [CN], num_threads=1, extra_args=device, wait=False),
        "inline": start_controlnet(
            zoo_root, [CN], num_threads=1, extra_args=[*device, "--residual-transports"], wait=False
        ),
        "shm": start_controlnet(
            zoo_root, [CN], num_threads=1, extra_args=[*device, "--residual-transports", "shared_memory"], wait=False
        ),
    }
    try:
        for service in services.values():
            service.wait_ready()
        stub = unet_pb2_grpc.UNetWorkerStub(rpc.create_channel(services["unet"].address))
        controlnets = [ControlNet(CN, conditioning_image(0), 1.0, 0.0, 1.0)]
        got = {
            worker: stub.Denoise(denoise_request(MODEL, controlnets, [services[worker].address], 7.5), timeout=300)
            for worker in ("ipc", "inline", "shm")
        }
        assert list(got["ipc"].controlnet_transports) == [common_pb2.RESIDUAL_TRANSPORT_CUDA_IPC]
        assert list(got["inline"].controlnet_transports) == [common_pb2.RESIDUAL_TRANSPORT_INLINE]
        assert list(got["shm"].controlnet_transports) == [common_pb2.RESIDUAL_TRANSPORT_SHARED_MEMORY]
        latents = {w: codec.tensor_from_proto(r.latents) for w, r in got.items()}
        assert torch.equal(latents["ipc"], latents["inline"]) and torch.equal(latents["shm"], latents["inline"])
    finally:
        for service in services.values():
            service.stop()


def ring_mapped(pid: int) -> bool:
    return shm.PREFIX in (Path(f"/proc/{pid}") / "maps").read_text()


def steps_on_the_socket(stub, controlnet_address: str, timeout: float):
    """A long request with its ControlNet on `controlnet_address`, advanced past the ring's offer
    and answer: its steps go over the step socket now."""
    controlnets = [ControlNet(CN, conditioning_image(0), 1.0, 0.0, 1.0)]
    call = stub.DenoiseStream(
        denoise_request(MODEL, controlnets, [controlnet_address], 7.5, steps=400), timeout=timeout
    )
    for _ in range(3):
        next(call)
    return call


def test_a_unet_worker_killed_mid_request_ends_the_controlnet_session_and_its_ring(zoo_root):
    """The UNet worker dies while its steps travel over the step socket: the ControlNet worker's
    session sees the socket end, lets go of the ring (nothing of it stays mapped or in /dev/shm)
    and the worker serves on."""
    controlnet = start_controlnet(zoo_root, [CN], num_threads=1, wait=False)
    unet = start_unet(zoo_root, MODEL, num_threads=1, extra_args=["--max-steps", "1000"], wait=False)
    try:
        controlnet.wait_ready()
        unet.wait_ready()
        stub = unet_pb2_grpc.UNetWorkerStub(rpc.create_channel(unet.address))
        _call = steps_on_the_socket(stub, controlnet.address, 120)  # held: a dropped call is cancelled
        assert ring_mapped(controlnet.process.pid)
        unet.process.kill()
        deadline = time.monotonic() + 10
        while ring_mapped(controlnet.process.pid):
            assert time.monotonic() < deadline, "the ControlNet worker still maps the ring of a dead peer"
            time.sleep(0.1)
        assert not list(transport.SHM_DIR.glob(f"{shm.PREFIX}{controlnet.process.pid}[.-]*"))
        listing = controlnet_pb2_grpc.ControlNetWorkerStub(rpc.create_channel(controlnet.address)).ListControlNets(
            controlnet_pb2.ControlNetWorkerListControlNetsRequest(), timeout=10
        )
        assert next(c for c in listing.controlnets if c.controlnet_id == CN).loaded
    finally:
        unet.stop()
        controlnet.stop()


def test_a_controlnet_worker_that_hangs_mid_request_fails_it_at_its_deadline(workers, zoo_root):
    """Steps go over the step socket, then the ControlNet worker stops answering: the request
    ends DEADLINE_EXCEEDED at its deadline (the stream's), not at the much longer per-step wait."""
    services, _ = workers
    hung = start_controlnet(zoo_root, [CN], num_threads=1)
    try:
        stub = unet_pb2_grpc.UNetWorkerStub(rpc.create_channel(services["unet"].address))
        call = steps_on_the_socket(stub, hung.address, timeout=6)
        os.kill(hung.process.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The worker let go of the request then too (the caller's deadline alone would not show it).
        while stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5).requests_in_flight:
            assert time.monotonic() - t0 < 10, "the UNet worker still waits for the hung ControlNet worker"
            time.sleep(0.1)
    finally:
        os.kill(hung.process.pid, signal.SIGCONT)
        hung.stop()


def test_the_ring_handoff_benchmark_reads_every_step_as_written(sd15):
    """bench.ring_handoff (the GPU run's measure of the CUDA IPC handoff) on the shared-memory ring:
    a writer process fills 8 steps, the reader gets each step's values and sends the next step's
    sample back through the ring (a stale or torn slot or sample would fail the run), and the
    shapes it plans are those the family's ControlNet makes and takes."""
    from bench import ring_handoff
    from swiftd.controlnet_step import ControlNetStepper

    result = ring_handoff.run(transport.SHARED_MEMORY, "tiny-sd15", "cpu", "float32", steps=8)
    assert result["steps"] == 8 and result["transport"] == "shared_memory"
    assert result["handoff_ms_median"] > 0 and result["sample_handoff_ms_median"] > 0
    stepper, unet = ControlNetStepper(sd15.controlnets[CN]), sd15.pipe.unet
    size = unet.config.sample_size
    hint = stepper.embed_condition(torch.rand(2, 3, size * 8, size * 8))
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim)
    residuals = stepper.step(torch.randn(2, 4, size, size), torch.tensor(500.0), hidden, hint, 1.0)
    made = [*residuals.down_block_res_samples, residuals.mid_block_res_sample]
    assert ring_handoff.residual_shapes("tiny-sd15") == [tuple(r.shape) for r in made]
    assert result["bytes_per_step"] == sum(r.numel() for r in made) * 4
    assert result["sample_shape"] == [2, unet.config.in_channels, size, size]  # each step's other way
