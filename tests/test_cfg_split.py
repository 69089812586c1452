"""CFG split (latent parallelism): the conditional and unconditional halves of the guidance batch on
two real UNet worker processes on loopback, exchanging noise predictions every step.

Bound: the split's final latents equal the unsplit path's, and plain Diffusers', within 1e-4 (fp32)
for SD1.5 and SDXL, with and without a ControlNet, for a deterministic (Euler) and an ancestral
(Euler a) scheduler. They are not bit-identical: each half runs the UNet on a batch of one, and
oneDNN's convolutions (and a GEMV where a batch of two makes a GEMM) round differently for one
image than for two, by about 1e-6 per step. DDIM over 5 steps amplifies that the most: on the
tiny SDXL it reaches 1.4e-4 (2.5e-4 with a ControlNet), where Diffusers' own result for the same
request moves by 1.1e-4 when it runs in a batch of two prompts (and our unsplit path by 0.9e-4
between one and two threads). So for DDIM the bound is 1e-4 or three times Diffusers' own
movement, whichever is larger, measured in the test.

Either side's failure or cancellation ends both; a busy partner refuses at once; through the
gateway, a request on two idle devices is planned and run as a split, and one on a busy machine
is not.
"""

from __future__ import annotations

import io
import os
import re
import time
from dataclasses import replace

import grpc
import numpy as np
import PIL.Image
import pytest
import torch

from swiftd import codec, rpc
from swiftd.images import edge_image
from swiftd.launcher import start_controlnet, start_gateway, start_lora_store, start_unet
from swiftd.request import CfgSplit, ControlNet, Lora, Request
from swiftd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, unet_pb2, unet_pb2_grpc
from tests.reference import SIZE, STEPS, TOLERANCE, assert_close, assert_far, conditioning_image, max_abs_diff

PROMPT = "a cat in space"
SEED = 5
FAMILIES = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl"}
LORA = "tiny-sd15-lora-kohya-r16-te"
CORES = [0, 1 % os.cpu_count()]  # one "device" per half, as the traffic bench deploys them


class Pair:
    """Two UNet workers of one model, each pinned to its own core."""

    def __init__(self, zoo_root, model_id: str):
        self.model_id = model_id
        self.services = [
            start_unet(
                zoo_root, model_id, cpu_cores=[core], num_threads=1, wait=False, extra_args=["--max-steps", "1000"]
            )
            for core in CORES
        ]
        for service in self.services:
            service.wait_ready()
        self.channels = [rpc.create_channel(s.address) for s in self.services]
        self.stubs = [unet_pb2_grpc.UNetWorkerStub(c) for c in self.channels]
        self.leader, self.partner = self.stubs
        self.addresses = [s.address for s in self.services]

    def stop(self):
        for channel in self.channels:
            channel.close()
        for service in self.services:
            service.stop()
            assert service.process.returncode == 0, service.log_tail()

    def wait_idle(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        for stub in self.stubs:
            while True:
                status = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5)
                if status.requests_in_flight == 0 and status.queue_length == 0:
                    break
                assert time.monotonic() < deadline, "a worker is still busy"
                time.sleep(0.05)


@pytest.fixture(scope="module")
def sd15_pair(zoo_root):
    pair = Pair(zoo_root, FAMILIES["sd15"])
    yield pair
    pair.stop()


@pytest.fixture(scope="module")
def sdxl_pair(zoo_root):
    pair = Pair(zoo_root, FAMILIES["sdxl"])
    yield pair
    pair.stop()


def make_request(fam, scheduler: str, controlnet: bool, **fields) -> Request:
    controlnets = [ControlNet(fam.ids[0], conditioning_image(0))] if controlnet else []
    return Request(
        PROMPT,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        seed=SEED,
        scheduler=scheduler,
        controlnets=controlnets,
        return_latents=True,
        **fields,
    )


def split(request: Request, pair: Pair) -> Request:
    return replace(request, cfg_split=CfgSplit(pair.addresses[1]))


def latents(response: unet_pb2.DenoiseResponse) -> torch.Tensor:
    return codec.tensor_from_proto(response.latents)


def run_both(pair: Pair, plain: Request) -> tuple[unet_pb2.DenoiseResponse, unet_pb2.DenoiseResponse]:
    """The request unsplit on the leader, then split with the partner."""
    unsplit = pair.leader.Denoise(plain.to_denoise_pb(), timeout=120)
    halves = pair.leader.Denoise(split(plain, pair).to_denoise_pb(), timeout=120)
    return unsplit, halves


def diffusers(fam, request: Request, prompts: int = 1) -> torch.Tensor:
    """Plain Diffusers for the same request; `prompts` > 1 runs it that many times in one batch."""
    prompt, generator = PROMPT, torch.Generator().manual_seed(SEED)
    if prompts > 1:
        prompt, generator = [PROMPT] * prompts, [torch.Generator().manual_seed(SEED) for _ in range(prompts)]
    return fam.diffusers_latents(
        request.scheduler, request.controlnets, prompt=prompt, guidance_scale=7.5, generator=generator
    )[:1]


@pytest.mark.parametrize("controlnet", [False, True], ids=["plain", "controlnet"])
@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_split_equals_unsplit_and_diffusers(request, family, scheduler, controlnet):
    pair: Pair = request.getfixturevalue(f"{family}_pair")
    fam = request.getfixturevalue(family)
    plain = make_request(fam, scheduler, controlnet)
    unsplit, halves = run_both(pair, plain)

    # The partner did run the unconditional half: it says so, and its stages come back prefixed.
    assert halves.cfg_partner == pair.addresses[1] and unsplit.cfg_partner == ""
    stages = {t.stage for t in halves.timings}
    assert {"cfg_partner.text_encode", "cfg_partner.denoise", "vae_decode"} <= stages
    assert "cfg_partner.vae_decode" not in stages  # the leader alone decodes
    ours = latents(halves)
    assert_close(ours, latents(unsplit))
    reference = diffusers(fam, plain)
    assert_close(ours, reference)
    assert not torch.equal(ours, latents(unsplit))  # batches of one: the split did run
    if not controlnet:  # negative control: without guidance the same request fails the bound
        unguided = pair.leader.Denoise(replace(plain, guidance_scale=1.0).to_denoise_pb(), timeout=120)
        assert_far(latents(unguided), reference)


@pytest.mark.parametrize("controlnet", [False, True], ids=["plain", "controlnet"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_split_with_ddim_is_within_diffusers_own_batch_floor(request, family, controlnet):
    """DDIM amplifies rounding the most (see the module docstring): the bound is 1e-4 or three
    times what Diffusers' own result moves by when the request shares a batch, the larger."""
    pair: Pair = request.getfixturevalue(f"{family}_pair")
    fam = request.getfixturevalue(family)
    plain = make_request(fam, "ddim", controlnet)
    unsplit, halves = run_both(pair, plain)
    reference = diffusers(fam, plain)
    floor = max_abs_diff(diffusers(fam, plain, prompts=2), reference)
    bound = max(TOLERANCE, 3 * floor)
    assert_close(latents(unsplit), reference, 1e-6)  # the unsplit path: Diffusers' own numbers
    assert_close(latents(halves), latents(unsplit), bound)
    assert_close(latents(halves), reference, bound)


def test_split_with_a_lora_and_a_guess_mode_controlnet_equals_unsplit(request, sd15_pair):
    """Both halves patch the same LoRA set before the first step (K taken as 0 on both, however
    large the request's); a guess-mode ControlNet acts on the conditional half only."""
    fam = request.getfixturevalue("sd15")
    base = make_request(fam, "euler", True, loras=[Lora(LORA, 0.8)], lora_bound_steps=3)
    base.controlnets[0].guess_mode = True
    unsplit = sd15_pair.leader.Denoise(replace(base, lora_bound_steps=0).to_denoise_pb(), timeout=120)
    halves = sd15_pair.leader.Denoise(split(base, sd15_pair).to_denoise_pb(), timeout=120)
    assert halves.lora_applied_at_step == unsplit.lora_applied_at_step == 0
    assert_close(latents(halves), latents(unsplit))
    partner = sd15_pair.partner.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5)
    assert [(r.lora_id, pytest.approx(r.scale)) for r in partner.applied_loras] == [(LORA, 0.8)]
    # Negative control: without the LoRA the same split request is far from it.
    plain = sd15_pair.leader.Denoise(split(replace(base, loras=[]), sd15_pair).to_denoise_pb(), timeout=120)
    assert_far(latents(plain), latents(unsplit))


def test_a_failing_partner_fails_the_leader_and_frees_both(request, sd15_pair, tmp_path):
    """The partner's ControlNet worker does not have the ControlNet: the partner fails while the
    leader is already denoising; the leader's caller gets that error naming the partner and the
    ControlNet worker, nothing hangs, and both serve again."""
    fam = request.getfixturevalue("sd15")
    (tmp_path / "controlnets").mkdir()
    empty = start_controlnet(tmp_path, num_threads=1)  # a real worker with no ControlNets at all
    try:
        base = make_request(fam, "ddim", True)
        broken = replace(base, cfg_split=CfgSplit(sd15_pair.addresses[1], (empty.address,)))
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            sd15_pair.leader.Denoise(broken.to_denoise_pb(), timeout=120)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND, error.value.details()
        assert f"cfg partner {sd15_pair.addresses[1]}" in error.value.details()
        assert empty.address in error.value.details()
        assert time.monotonic() - t0 < 30
    finally:
        empty.stop()
    sd15_pair.wait_idle()
    # Both serve again, split.
    assert sd15_pair.leader.Denoise(split(base, sd15_pair).to_denoise_pb(), timeout=120).image_png


def test_a_partner_whose_controlnet_worker_is_gone_runs_it_in_process(request, sd15_pair):
    """The partner's ControlNet worker cannot be reached: the partner runs that ControlNet itself
    (it has it in its model root), and the split image equals the unsplit one."""
    fam = request.getfixturevalue("sd15")
    base = make_request(fam, "ddim", True)
    unsplit = sd15_pair.leader.Denoise(base.to_denoise_pb(), timeout=120)
    gone = replace(base, cfg_split=CfgSplit(sd15_pair.addresses[1], ("127.0.0.1:1",)))
    halves = sd15_pair.leader.Denoise(gone.to_denoise_pb(), timeout=120)
    assert halves.cfg_partner == sd15_pair.addresses[1]
    assert_close(latents(halves), latents(unsplit))


def test_each_half_reports_how_its_controlnet_residuals_arrived(request, sd15_pair, zoo_root):
    """Both halves stream their ControlNet from a worker on this host: each says shared memory,
    the partner's through the leader (so that the gateway's final plan shows both halves)."""
    fam = request.getfixturevalue("sd15")
    worker = start_controlnet(zoo_root, [fam.ids[0]], num_threads=1)
    try:
        base = make_request(fam, "ddim", True)
        base = replace(base, controlnets=[replace(base.controlnets[0], worker_address=worker.address)])
        unsplit = sd15_pair.leader.Denoise(base.to_denoise_pb(), timeout=120)
        halves = sd15_pair.leader.Denoise(
            replace(base, cfg_split=CfgSplit(sd15_pair.addresses[1], (worker.address,))).to_denoise_pb(), timeout=120
        )
    finally:
        worker.stop()
    shared = [common_pb2.RESIDUAL_TRANSPORT_SHARED_MEMORY]
    assert list(unsplit.controlnet_transports) == shared and not unsplit.cfg_partner_controlnet_transports
    assert list(halves.controlnet_transports) == list(halves.cfg_partner_controlnet_transports) == shared
    assert_close(latents(halves), latents(unsplit))


def test_cancelling_the_leader_stops_the_partner(request, sd15_pair):
    fam = request.getfixturevalue("sd15")
    partner_log = sd15_pair.services[1]
    logged_before = len(partner_log.log_lines)
    long = replace(make_request(fam, "euler", False, request_id="split-cancel-me"), num_inference_steps=1000)
    call = sd15_pair.leader.DenoiseStream(split(long, sd15_pair).to_denoise_pb(), timeout=120)
    for event in call:
        if event.HasField("progress") and event.progress.step == 3:
            break
    call.cancel()
    pattern = re.compile(r"request split-cancel-me: .*(cancelled|went away)")
    deadline = time.monotonic() + 20
    while not any(pattern.search(line) for line in partner_log.log_lines[logged_before:]):
        assert time.monotonic() < deadline, partner_log.log_tail()
        time.sleep(0.05)
    sd15_pair.wait_idle()


def test_a_busy_partner_refuses_at_once_and_the_leader_runs_alone(request, sd15_pair):
    """A partner never queues behind another request (two leaders waiting for each other's
    worker would deadlock): it refuses with RESOURCE_EXHAUSTED, and the leader, not yet started,
    runs the whole batch itself instead of failing the request."""
    fam = request.getfixturevalue("sd15")
    plain = make_request(fam, "ddim", False)
    long = replace(plain, num_inference_steps=1000, scheduler="euler")  # DDIM cannot take 1000 steps
    exchange = unet_pb2.GuidanceMessage(start=unet_pb2.GuidanceStart(request=plain.to_denoise_pb()))
    busy = sd15_pair.partner.DenoiseStream(long.to_denoise_pb(), timeout=120)
    try:
        next(e for e in busy if e.HasField("progress"))
        with pytest.raises(grpc.RpcError) as error:
            list(sd15_pair.partner.ExchangeGuidance(iter([exchange]), timeout=30))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.details()
        alone = sd15_pair.leader.Denoise(split(plain, sd15_pair).to_denoise_pb(), timeout=60)
    finally:
        busy.cancel()
    assert alone.cfg_partner == "" and "cfg_partner.denoise" not in {t.stage for t in alone.timings}
    unsplit = sd15_pair.leader.Denoise(plain.to_denoise_pb(), timeout=60)
    assert torch.equal(latents(alone), latents(unsplit))
    sd15_pair.wait_idle()


def test_a_split_request_round_trips_and_needs_guidance(request, sd15_pair):
    fam = request.getfixturevalue("sd15")
    sent = replace(make_request(fam, "ddim", False), cfg_split=CfgSplit("h:1", ("c:2",), ("l",)))
    assert Request.from_pb(unet_pb2.DenoiseRequest.FromString(sent.to_denoise_pb().SerializeToString())) == sent
    assert Request.from_pb(replace(sent, cfg_split=None).to_denoise_pb()).cfg_split is None
    unguided = replace(split(make_request(fam, "ddim", False), sd15_pair), guidance_scale=1.0)
    with pytest.raises(grpc.RpcError) as error:
        sd15_pair.leader.Denoise(unguided.to_denoise_pb(), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cfg_split" in error.value.details()


# -- through the gateway ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(sd15_pair, zoo_root, tmp_path_factory):
    store = start_lora_store(zoo_root, tmp_path_factory.mktemp("lora-cache"), base_models=[FAMILIES["sd15"]])
    service = start_gateway(sd15_pair.addresses, lora_store=store.address, extra_args=["--max-steps", "1000"])
    channel = rpc.create_channel(service.address)
    yield gateway_pb2_grpc.GatewayStub(channel)
    channel.close()
    service.stop()
    store.stop()


def generate_request(steps=STEPS, guidance=7.5, controlnet=True, loras=()) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        loras=[common_pb2.LoraRef(lora_id=i, scale=s) for i, s in loras],
        params=common_pb2.GenerationParams(
            prompt=PROMPT,
            width=SIZE,
            height=SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=SEED,
            scheduler=common_pb2.SCHEDULER_EULER,
            model_id=FAMILIES["sd15"],
        ),
        controlnets=[common_pb2.ControlNetInput(controlnet_id="tiny-sd15-cn-edges", image=edge_image(SIZE))]
        if controlnet
        else [],
    )


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def test_gateway_splits_a_request_over_two_idle_devices(gateway, sd15_pair):
    sd15_pair.wait_idle()
    events = list(gateway.GenerateStream(generate_request(), timeout=120))
    started = next(e.started for e in events if e.HasField("started"))
    final = events[-1].final
    plan = final.plan
    assert started.plan == plan
    assert plan.placement == gateway_pb2.PLACEMENT_CFG_SPLIT, plan.reason
    assert "2 idle devices" in plan.reason
    assert {plan.unet_worker, plan.cfg_partner.unet_worker} == set(sd15_pair.addresses)
    # Each half's ControlNet in-process on its own worker.
    assert [a.worker for a in plan.controlnets] == [a.worker for a in plan.cfg_partner.controlnets] == [""]
    assert "cfg_partner.denoise" in {t.stage for t in final.timings}

    # The same request unsplit on the leader: the same image (latents within 1e-4; PNG levels may
    # differ by one where a value sits on a rounding boundary).
    direct = unet_pb2.DenoiseRequest(
        params=generate_request().params,
        controlnets=[unet_pb2.ControlNetAttachment(input=cn) for cn in generate_request().controlnets],
    )
    unsplit = unet_pb2_grpc.UNetWorkerStub(rpc.create_channel(plan.unet_worker)).Denoise(direct, timeout=120)
    assert np.abs(pixels(final.image_png) - pixels(unsplit.image_png)).max() <= 1

    # Without guidance there is nothing to split.
    plain = gateway.Generate(generate_request(guidance=1.0), timeout=120).plan
    assert plain.placement == gateway_pb2.PLACEMENT_PACK and "no classifier-free guidance" in plain.reason


def test_gateway_pushes_the_lora_set_to_both_halves(gateway, sd15_pair):
    """A scale no worker holds yet: the store pushes the deltas to each half's worker, both patch
    them before the first step, and the image is the unsplit one's."""
    sd15_pair.wait_idle()
    request = generate_request(controlnet=False, loras=[(LORA, 0.55)])
    response = gateway.Generate(request, timeout=120)
    plan = response.plan
    assert plan.placement == gateway_pb2.PLACEMENT_CFG_SPLIT, plan.reason
    assert list(plan.pushed_lora_ids) == list(plan.cfg_partner.pushed_lora_ids) == [LORA]
    assert response.lora_applied_at_step == 0
    for stub in sd15_pair.stubs:
        status = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5)
        assert [(r.lora_id, pytest.approx(r.scale)) for r in status.applied_loras] == [(LORA, 0.55)]
    direct = unet_pb2.DenoiseRequest(params=request.params, loras=request.loras)
    unsplit = unet_pb2_grpc.UNetWorkerStub(rpc.create_channel(plan.unet_worker)).Denoise(direct, timeout=120)
    assert np.abs(pixels(response.image_png) - pixels(unsplit.image_png)).max() <= 1
    # Affinity next time: both have the set, nothing travels.
    again = gateway.Generate(request, timeout=120).plan
    assert again.placement == gateway_pb2.PLACEMENT_CFG_SPLIT
    assert again.lora_set_already_applied and again.cfg_partner.lora_set_already_applied
    assert not again.pushed_lora_ids and not again.cfg_partner.pushed_lora_ids


def test_gateway_does_not_split_while_a_device_is_busy(gateway, sd15_pair):
    sd15_pair.wait_idle()
    first = gateway.GenerateStream(generate_request(steps=1000, controlnet=False), timeout=120)
    try:
        plan = next(e.started.plan for e in first if e.HasField("started"))
        assert plan.placement == gateway_pb2.PLACEMENT_CFG_SPLIT
        # Both devices busy with the first request's halves: the second is packed on one worker
        # (it waits there for the first to end, which the cancel below brings about).
        second = gateway.GenerateStream(generate_request(steps=2), timeout=120)
        second_plan = next(e.started.plan for e in second if e.HasField("started"))
        assert second_plan.placement == gateway_pb2.PLACEMENT_PACK, second_plan.reason
        assert "fewer than 2 idle devices" in second_plan.reason
        first.cancel()
        assert list(second)[-1].final.image_png
    finally:
        first.cancel()
    sd15_pair.wait_idle()
