"""LoRAs through the LoRA store: deltas pulled or pushed into UNet workers over loopback, patched
in place. K = 0 equals Diffusers' load_lora_weights + fuse_lora (fp32, 1e-4); a LoRA set patched
in on arrival equals Diffusers with the UNet part fused in before the step the response reports
(1e-4); a pushed set is used without any pull; removal restores the base weights exactly; bad
LoRAs fail cleanly and change nothing."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from swiftd import codec, rpc, zoo
from swiftd.launcher import start_lora_store, start_unet
from swiftd.loading import load_pipeline
from swiftd.v1 import common_pb2, lora_store_pb2, lora_store_pb2_grpc, unet_pb2, unet_pb2_grpc
from tests.reference import assert_far, diffusers_fused_latents, diffusers_patched_at_step

FAMILIES = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl"}
TOLERANCE = 1e-4
CASES = {
    "peft": [("lora-peft-r4", 1.0)],
    "kohya-te-scaled": [("lora-kohya-r16-te", 0.7)],
    "kohya-conv": [("lora-kohya-r8-conv", 1.0)],
    "two-loras": [("lora-peft-r64", 0.5), ("lora-kohya-r16-te", 0.8)],
}


@pytest.fixture(scope="module")
def suite(zoo_root, tmp_path_factory):
    store = start_lora_store(
        zoo_root, tmp_path_factory.mktemp("lora-cache"), base_models=list(FAMILIES.values()), num_threads=1
    )
    workers = {
        f: start_unet(zoo_root, m, lora_store=store.address, num_threads=1, wait=False) for f, m in FAMILIES.items()
    }
    for worker in workers.values():
        worker.wait_ready()
    channels = {f: rpc.create_channel(w.address) for f, w in workers.items()}
    store_channel = rpc.create_channel(store.address)
    yield store, workers, channels, store_channel
    for channel in [*channels.values(), store_channel]:
        channel.close()
    for service in [*workers.values(), store]:
        service.stop()


@pytest.fixture(scope="module")
def push_only_worker(zoo_root, tmp_path_factory):
    """A tiny-sd15 UNet worker that cannot get a LoRA by itself: started without --lora-store
    (nothing to pull from) on a model root whose loras/ is empty (nothing to prepare locally)."""
    root = tmp_path_factory.mktemp("push-only-root")
    (root / "models").symlink_to((zoo_root / "models").resolve())
    (root / "loras").mkdir()
    worker = start_unet(root, "tiny-sd15", num_threads=1, extra_args=["--lora-wait-timeout", "30"])
    channel = rpc.create_channel(worker.address)
    yield worker, channel
    channel.close()
    worker.stop()


_CACHE_LINE = re.compile(r"cache (?:host|disk|precompute) lora=(\S+) ")


def store_entry_reads(store) -> list[str]:
    """LoRA ids of every deltas read the store logged (one per LoRA per StreamDeltas or PushLoras)."""
    return [m.group(1) for line in list(store.log_lines) if (m := _CACHE_LINE.search(line))]


def wait_in_flight(channel, count=1, timeout=30.0):
    stub = unet_pb2_grpc.UNetWorkerStub(channel)
    deadline = time.monotonic() + timeout
    while stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=5).requests_in_flight < count:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)


def push_request(loras, worker_address, request_id):
    return lora_store_pb2.PushLorasRequest(
        loras=[common_pb2.LoraRef(lora_id=i, scale=s) for i, s in loras],
        base_model_id="tiny-sd15",
        dtype=common_pb2.DTYPE_FLOAT32,
        unet_worker_address=worker_address,
        request_id=request_id,
    )


@pytest.fixture(scope="module")
def references(zoo_root):
    return {f: load_pipeline(zoo.zoo_paths(zoo_root, m).model) for f, m in FAMILIES.items()}


def denoise_request(model_id, loras=(), k=0, **extra) -> unet_pb2.DenoiseRequest:
    return unet_pb2.DenoiseRequest(
        params=common_pb2.GenerationParams(
            prompt="a photo of a cat",
            width=64,
            height=64,
            num_inference_steps=4,
            guidance_scale=7.5,
            seed=2,
            scheduler=common_pb2.SCHEDULER_EULER,
            model_id=model_id,
        ),
        loras=[common_pb2.LoraRef(lora_id=i, scale=s) for i, s in loras],
        lora_bound_steps=k,
        return_latents=True,
        **extra,
    )


def denoise(channel, model_id, loras=(), k=0, **extra) -> unet_pb2.DenoiseResponse:
    request = denoise_request(model_id, loras, k, **extra)
    return unet_pb2_grpc.UNetWorkerStub(channel).Denoise(request, timeout=120)


REFERENCE_KWARGS = dict(
    prompt="a photo of a cat",
    height=64,
    width=64,
    num_inference_steps=4,
    guidance_scale=7.5,
    output_type="latent",
)


def diffusers_fused(pipe, zoo_root, family, loras):
    return diffusers_fused_latents(
        pipe,
        zoo.zoo_paths(zoo_root, FAMILIES[family]).loras,
        loras,
        generator=torch.Generator().manual_seed(2),
        **REFERENCE_KWARGS,
    )


def diffusers_patched_at(pipe, zoo_root, family, loras, step):
    return diffusers_patched_at_step(
        pipe,
        zoo.zoo_paths(zoo_root, FAMILIES[family]).loras,
        loras,
        step,
        generator=torch.Generator().manual_seed(2),
        **REFERENCE_KWARGS,
    )


def assert_patched_at_reported_step(ours, step, pipe, zoo_root, family, loras):
    """`ours` equals Diffusers with the LoRA set's UNet part fused in before `step` (within
    TOLERANCE), and fails the tolerance for any other step (negative controls: 0 is K = 0)."""
    reference = diffusers_patched_at(pipe, zoo_root, family, loras, step)
    diff = (ours - reference).abs().max().item()
    assert diff <= TOLERANCE, f"patched before step {step}: max abs difference {diff:.3g}"
    for other in range(4):
        if other != step:
            assert_far(ours, diffusers_patched_at(pipe, zoo_root, family, loras, other), TOLERANCE, factor=10)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", list(CASES))
def test_k0_through_the_store_matches_diffusers_fuse(suite, references, zoo_root, family, case):
    _, _, channels, _ = suite
    loras = [(f"{FAMILIES[family]}-{suffix}", scale) for suffix, scale in CASES[case]]
    response = denoise(channels[family], FAMILIES[family], loras, k=0)
    assert response.lora_applied_at_step == 0
    ours = codec.tensor_from_proto(response.latents)
    reference = diffusers_fused(references[family], zoo_root, family, loras)
    diff = (ours - reference).abs().max().item()
    assert diff <= TOLERANCE, f"max abs difference {diff:.3g}"


def test_removal_restores_base_weights_exactly(suite):
    _, _, channels, _ = suite
    plain = codec.tensor_from_proto(denoise(channels["sd15"], "tiny-sd15").latents)
    for loras in (
        [("tiny-sd15-lora-peft-r4", 1.0)],
        [("tiny-sd15-lora-kohya-r8-conv", 0.3), ("tiny-sd15-lora-peft-r64", -0.5)],
    ):
        with_lora = codec.tensor_from_proto(denoise(channels["sd15"], "tiny-sd15", loras).latents)
        assert not torch.equal(with_lora, plain)
        again = codec.tensor_from_proto(denoise(channels["sd15"], "tiny-sd15").latents)
        assert torch.equal(again, plain)  # bit-identical: the pristine weights were copied back


def test_affinity_second_request_patches_nothing(suite):
    _, workers, channels, _ = suite
    loras = [("tiny-sd15-lora-peft-r4", 0.9)]
    denoise(channels["sd15"], "tiny-sd15", loras)
    second = denoise(channels["sd15"], "tiny-sd15", loras)
    stages = {t.stage for t in second.timings}
    assert "lora_unet_patch" not in stages and second.lora_applied_at_step == 0
    status = unet_pb2_grpc.UNetWorkerStub(channels["sd15"]).GetWorkerStatus(
        unet_pb2.GetWorkerStatusRequest(), timeout=10
    )
    assert [(x.lora_id, round(x.scale, 6)) for x in status.applied_loras] == [("tiny-sd15-lora-peft-r4", 0.9)]


def test_pushed_deltas_are_used_and_nothing_is_pulled(suite, push_only_worker, references, zoo_root):
    """As the gateway does it: the request names its LoRAs as pushed, the store pushes them while
    the request waits. The worker has no store to pull from and no LoRA files, and the store logs
    no read of the LoRA but the push's: the image can only come from the pushed deltas."""
    store, _, _, store_channel = suite
    worker, channel = push_only_worker
    loras = [("tiny-sd15-lora-kohya-r16-te", 0.61)]
    # Control: asked without a push, the worker cannot get the LoRA at all.
    with pytest.raises(grpc.RpcError) as info:
        denoise(channel, "tiny-sd15", loras)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
    plain = codec.tensor_from_proto(denoise(channel, "tiny-sd15").latents)

    reads_before = store_entry_reads(store)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            denoise, channel, "tiny-sd15", loras, pushed_lora_ids=[loras[0][0]], request_id="push-only-1"
        )
        wait_in_flight(channel)  # the request is waiting for its deltas
        pushed = lora_store_pb2_grpc.LoraStoreStub(store_channel).PushLoras(
            push_request(loras, worker.address, "push-only-1"), timeout=60
        )
        response = call.result(timeout=120)
    assert pushed.parameters_sent > 0
    assert response.lora_applied_at_step == 0
    ours = codec.tensor_from_proto(response.latents)
    reference = diffusers_fused(references["sd15"], zoo_root, "sd15", loras)
    diff = (ours - reference).abs().max().item()
    assert diff <= TOLERANCE, f"max abs difference {diff:.3g}"
    assert_far(ours, plain, TOLERANCE)  # negative control: the base weights fail the tolerance
    time.sleep(0.5)  # let the store's log pump catch up
    assert store_entry_reads(store)[len(reads_before) :] == [loras[0][0]], "the store served more than the push"


def test_on_arrival_pulled_matches_diffusers_patched_at_the_reported_step(suite, references, zoo_root):
    """K larger than the steps: the UNet deltas go in at the first step boundary after they are
    complete, whichever that is; the latents must be those of that step."""
    _, _, channels, _ = suite
    loras = [("tiny-sd15-lora-peft-r64", 0.37)]
    response = denoise(channels["sd15"], "tiny-sd15", loras, k=100)
    step = response.lora_applied_at_step
    assert 0 <= step <= 3
    ours = codec.tensor_from_proto(response.latents)
    assert_patched_at_reported_step(ours, step, references["sd15"], zoo_root, "sd15", loras)


def test_on_arrival_mid_loop_matches_diffusers_patched_at_the_reported_step(
    suite, push_only_worker, references, zoo_root
):
    """The store's chunks reach the worker's ReceiveLoraDeltas with a pause after the text-encoder
    part, held until step 0 is done: the set goes in at step 1, 2 or 3 (3 = the last step, where
    the loop waits), and the latents are those of Diffusers with the UNet part fused in there."""
    _, _, _, store_channel = suite
    worker, channel = push_only_worker
    loras = [("tiny-sd15-lora-kohya-r16-te", 0.45)]
    chunks = list(
        lora_store_pb2_grpc.LoraStoreStub(store_channel).StreamDeltas(
            lora_store_pb2.StreamDeltasRequest(
                loras=[common_pb2.LoraRef(lora_id=i, scale=s) for i, s in loras],
                base_model_id="tiny-sd15",
                dtype=common_pb2.DTYPE_FLOAT32,
                request_id="on-arrival",
            ),
            timeout=60,
        )
    )
    first_unet = next(i for i, c in enumerate(chunks) if any(d.parameter_name.startswith("unet.") for d in c.deltas))
    assert first_unet < len(chunks) - 1
    step_zero_done = threading.Event()

    def held_back():
        yield from chunks[: first_unet + 1]  # text-encoder part complete: text encoding may start
        assert step_zero_done.wait(60)
        yield from chunks[first_unet + 1 :]

    stub = unet_pb2_grpc.UNetWorkerStub(channel)
    request = denoise_request("tiny-sd15", loras, k=100, pushed_lora_ids=[loras[0][0]], request_id="on-arrival")
    with ThreadPoolExecutor(1) as pool:
        received = pool.submit(stub.ReceiveLoraDeltas, held_back(), timeout=120)
        final = None
        try:
            for message in stub.DenoiseStream(request, timeout=120):
                if message.HasField("progress") and message.progress.step == 1:  # step 0 done
                    step_zero_done.set()
                if message.HasField("final"):
                    final = message.final
        finally:
            step_zero_done.set()  # never leave the push hanging
        assert list(received.result(timeout=60).lora_ids) == [loras[0][0]]
    step = final.lora_applied_at_step
    assert step in (1, 2, 3)
    ours = codec.tensor_from_proto(final.latents)
    assert_patched_at_reported_step(ours, step, references["sd15"], zoo_root, "sd15", loras)


@pytest.mark.parametrize(
    "loras, code, text",
    [
        ([("no-such-lora", 1.0)], grpc.StatusCode.NOT_FOUND, "no-such-lora"),
        ([("tiny-sdxl-lora-peft-r4", 1.0)], grpc.StatusCode.FAILED_PRECONDITION, "tiny-sdxl-lora-peft-r4"),
        ([("../loras/x", 1.0)], grpc.StatusCode.INVALID_ARGUMENT, "lora_id"),
    ],
    ids=["unknown", "other-family", "path"],
)
def test_bad_loras_fail_cleanly_and_change_nothing(suite, loras, code, text):
    _, _, channels, _ = suite
    plain = codec.tensor_from_proto(denoise(channels["sd15"], "tiny-sd15").latents)
    with pytest.raises(grpc.RpcError) as info:
        denoise(channels["sd15"], "tiny-sd15", loras)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()
    assert torch.equal(codec.tensor_from_proto(denoise(channels["sd15"], "tiny-sd15").latents), plain)


def test_poisoned_pushes_are_refused_and_never_served(suite, references, zoo_root):
    """Anyone who reaches ReceiveLoraDeltas once poisoned a worker's cache: a NaN delta pushed under
    a real LoRA id at an unused scale was served to the next request at that scale (a black image).
    Now each delta must name a parameter of the model with its shape, in the worker's dtype, finite,
    and the LoRA's digest must match what arrived; a refused LoRA is never reported as cached, and
    the next request for it gets the store's real deltas (equal to Diffusers' fuse)."""
    from swiftd.lora import WeightDelta, deltas_to_chunks, extract_deltas, prepare_deltas

    _, _, channels, _ = suite
    stub = unet_pb2_grpc.UNetWorkerStub(channels["sd15"])
    lora, scale = "tiny-sd15-lora-peft-r4", 0.55
    pipe = load_pipeline(zoo.zoo_paths(zoo_root, "tiny-sd15").model)
    real = prepare_deltas(extract_deltas(pipe, zoo.zoo_paths(zoo_root, "tiny-sd15").loras[lora]), scale, torch.float32)
    first = next(iter(real))

    def variant(**change) -> dict:
        deltas = dict(real)
        deltas.update(change)
        return deltas

    nan = real[first].up.clone()
    nan[0, 0] = float("nan")
    poisoned = {
        "non-finite": variant(**{first: WeightDelta(nan, real[first].down)}),
        "not in this model": variant(**{"unet.no_such_block.weight": real[first]}),
        "weight is": variant(**{first: WeightDelta(real[first].up[:, :1], real[first].down[:1, :-1])}),
        "this worker serves": variant(**{first: WeightDelta(real[first].up.half(), real[first].down.half())}),
    }
    for text, deltas in poisoned.items():  # each with a digest that matches it: content checks
        with pytest.raises(grpc.RpcError) as refused:
            stub.ReceiveLoraDeltas(deltas_to_chunks(lora, scale, deltas, chunk_bytes=32 * 1024), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert text in refused.value.details()

    chunks = list(deltas_to_chunks(lora, scale, real, chunk_bytes=32 * 1024))
    doubled = list(deltas_to_chunks(lora, scale, {n: WeightDelta(d.up * 2, d.down) for n, d in real.items()}))
    without_digest = chunks[:-1] + [_with_digest(chunks[-1], b"")]
    forged = doubled[:-1] + [_with_digest(doubled[-1], chunks[-1].sha256)]  # the real digest, other deltas
    for stream in (without_digest, forged):
        with pytest.raises(grpc.RpcError) as refused:
            stub.ReceiveLoraDeltas(iter(stream), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "digest" in refused.value.details()

    status = stub.GetWorkerStatus(unet_pb2.GetWorkerStatusRequest(), timeout=10)
    assert (lora, scale) not in {(c.lora_id, round(c.scale, 6)) for c in status.cached_loras}
    response = denoise(channels["sd15"], "tiny-sd15", [(lora, scale)], k=0)  # pulled from the store
    ours = codec.tensor_from_proto(response.latents)
    reference = diffusers_fused(references["sd15"], zoo_root, "sd15", [(lora, scale)])
    assert (ours - reference).abs().max().item() <= TOLERANCE


def _with_digest(chunk: lora_store_pb2.LoraDeltaChunk, sha256: bytes) -> lora_store_pb2.LoraDeltaChunk:
    copy = lora_store_pb2.LoraDeltaChunk()
    copy.CopyFrom(chunk)
    copy.sha256 = sha256
    return copy
