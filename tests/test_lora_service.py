"""LoRAs through the LoRA store: deltas pulled or pushed into UNet workers over loopback, patched
in place. K = 0 equals Diffusers' load_lora_weights + fuse_lora (fp32, 1e-4); removal restores
the base weights exactly; bad LoRAs fail cleanly and change nothing."""

from __future__ import annotations

import grpc
import pytest
import torch

from swiftd import codec, rpc, zoo
from swiftd.launcher import start_lora_store, start_unet
from swiftd.loading import load_pipeline
from swiftd.v1 import common_pb2, lora_store_pb2, lora_store_pb2_grpc, unet_pb2, unet_pb2_grpc
from tests.reference import diffusers_fused_latents

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
def references(zoo_root):
    return {f: load_pipeline(zoo.zoo_paths(zoo_root, m).model) for f, m in FAMILIES.items()}


def denoise(channel, model_id, loras=(), k=0, **extra) -> unet_pb2.DenoiseResponse:
    request = unet_pb2.DenoiseRequest(
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
    return unet_pb2_grpc.UNetWorkerStub(channel).Denoise(request, timeout=120)


def diffusers_fused(pipe, zoo_root, family, loras):
    return diffusers_fused_latents(
        pipe,
        zoo.zoo_paths(zoo_root, FAMILIES[family]).loras,
        loras,
        prompt="a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(2),
        output_type="latent",
    )


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


def test_pushed_deltas_are_used(suite, references, zoo_root):
    _, workers, channels, store_channel = suite
    loras = [("tiny-sd15-lora-kohya-r16-te", 0.61)]
    pushed = lora_store_pb2_grpc.LoraStoreStub(store_channel).PushLoras(
        lora_store_pb2.PushLorasRequest(
            loras=[common_pb2.LoraRef(lora_id=i, scale=s) for i, s in loras],
            base_model_id="tiny-sd15",
            dtype=common_pb2.DTYPE_FLOAT32,
            unet_worker_address=workers["sd15"].address,
            request_id="push-1",
        ),
        timeout=60,
    )
    assert pushed.parameters_sent > 0
    response = denoise(channels["sd15"], "tiny-sd15", loras)
    reference = diffusers_fused(references["sd15"], zoo_root, "sd15", loras)
    assert (codec.tensor_from_proto(response.latents) - reference).abs().max().item() <= TOLERANCE


def test_on_arrival_reports_the_step(suite):
    _, _, channels, _ = suite
    response = denoise(channels["sd15"], "tiny-sd15", [("tiny-sd15-lora-peft-r64", 0.37)], k=100)
    assert 0 <= response.lora_applied_at_step <= 3


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
