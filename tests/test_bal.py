"""Bounded asynchronous LoRA loading in the engine: when deltas are patched in, what waits, what a
late patch computes (Diffusers with the LoRA's UNet part fused in before the step reported, fp32,
1e-4), and that a broken transfer leaves the base weights intact."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from services.unet.lora_inbox import LoraInbox
from services.unet.pipeline import UNetPipeline
from swiftd import zoo
from swiftd.errors import InvalidArgument, Unavailable
from swiftd.loading import load_pipeline
from swiftd.lora import deltas_to_chunks, extract_deltas, prepare_deltas
from swiftd.request import Lora, Request
from swiftd.v1 import lora_store_pb2
from tests.reference import TOLERANCE, assert_close, assert_far, diffusers_patched_at_step
from tests.test_lora_patch import weights_digest

LORA = "tiny-sd15-lora-kohya-r16-te"  # text encoder + UNet layers
STEPS = 6


@pytest.fixture(scope="module")
def setup(zoo_root):
    paths = zoo.zoo_paths(zoo_root, "tiny-sd15")
    pipe = load_pipeline(paths.model)
    deltas = prepare_deltas(extract_deltas(pipe, paths.loras[LORA]), 0.8, torch.float32)
    return pipe, deltas, paths


def engine_with_push_inbox(pipe):
    """An engine whose inbox neither pulls nor prepares: deltas arrive only when the test adds them."""
    inbox = LoraInbox(budget_bytes=1 << 40, dtype=torch.float32, base_model_id="tiny-sd15", wait_timeout=30)
    return UNetPipeline(pipe, lora_inbox=inbox), inbox


def request(k: int, loras=((LORA, 0.8),)) -> Request:
    return Request(
        "a cat",
        width=64,
        height=64,
        num_inference_steps=STEPS,
        seed=4,
        scheduler="euler",
        loras=list(loras),
        lora_bound_steps=k,
    )


def deliver(inbox, deltas, parts=("te", "unet")):
    """As the store streams: text-encoder deltas, then the UNet's (the first UNet delta marks
    the text-encoder part complete)."""
    items = list(deltas.items())
    first_unet = next(i for i, (n, _) in enumerate(items) if n.startswith("unet."))
    te, unet = items[: first_unet + 1], items[first_unet + 1 :]
    if "te" in parts:
        inbox.put(LORA, 0.8, te, last=False)
    if "unet" in parts:
        inbox.put(LORA, 0.8, unet, last=True)


def test_complete_deltas_apply_before_the_first_step_and_equal_synchronous(setup):
    pipe, deltas, _ = setup
    engine, inbox = engine_with_push_inbox(pipe)
    deliver(inbox, deltas)
    result = engine.generate(request(k=4))
    assert result.lora_applied_at_step == 0  # complete at the first boundary: no reason to wait
    engine.lora_patcher.restore()
    engine2, inbox2 = engine_with_push_inbox(pipe)
    deliver(inbox2, deltas)
    k0 = engine2.generate(request(k=0))
    engine2.lora_patcher.restore()
    assert torch.equal(result.latents, k0.latents)


def diffusers_patched_at(setup, step):
    """Diffusers (load_lora_weights + fuse_lora, Euler) with the UNet part in before `step`."""
    pipe, _, paths = setup
    return diffusers_patched_at_step(
        pipe,
        paths.loras,
        [(LORA, 0.8)],
        step,
        prompt="a cat",
        height=64,
        width=64,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(4),
        output_type="latent",
    )


def test_deltas_arriving_mid_loop_are_patched_at_the_next_boundary(setup):
    pipe, deltas, _ = setup
    engine, inbox = engine_with_push_inbox(pipe)
    deliver(inbox, deltas, parts=("te",))  # text encoder part first, as the store streams it

    def on_step(i, total, latents):
        if i == 1:  # the UNet part completes during step 1
            deliver(inbox, deltas, parts=("unet",))

    late = engine.generate(request(k=5), on_step=on_step)
    assert late.lora_applied_at_step == 2
    assert engine.lora_patcher.applied == ((LORA, 0.8),)
    engine.lora_patcher.restore()
    engine0, inbox0 = engine_with_push_inbox(pipe)
    deliver(inbox0, deltas)
    synchronous = engine0.generate(request(k=0))
    engine0.lora_patcher.restore()
    # Patched two steps late: what Diffusers gives with the UNet part fused in before step 2 ...
    assert_close(late.latents, diffusers_patched_at(setup, 2))
    # ... and (negative controls) neither synchronous nor patched at a neighbouring step.
    assert_close(synchronous.latents, diffusers_patched_at(setup, 0))
    for other in (0, 1, 3):
        assert_far(late.latents, diffusers_patched_at(setup, other), TOLERANCE, factor=10)


def test_the_loop_waits_at_the_bound(setup):
    pipe, deltas, _ = setup
    engine, inbox = engine_with_push_inbox(pipe)
    deliver(inbox, deltas, parts=("te",))
    timer = threading.Timer(1.0, deliver, args=(inbox, deltas), kwargs={"parts": ("unet",)})
    timer.start()
    t0 = time.perf_counter()
    result = engine.generate(request(k=1))
    timer.join()
    engine.lora_patcher.restore()
    assert result.lora_applied_at_step == 1
    assert time.perf_counter() - t0 >= 1.0
    assert result.timings["lora_unet_patch"] > 0.5  # the wait is visible in the breakdown


def test_text_encoder_part_does_not_wait_for_the_unet_part(setup):
    pipe, deltas, _ = setup
    _, inbox = engine_with_push_inbox(pipe)
    deliver(inbox, deltas, parts=("te",))
    fetch = inbox.fetch([(LORA, 0.8)], "r")
    ((lora_id, te),) = fetch.text_encoder_deltas()  # returns at once
    assert te and all(n.startswith("text_encoder") for n in te)  # only the text-encoder part
    assert not fetch.is_complete()


def test_broken_transfer_fails_the_request_and_restores_base_weights(setup):
    pipe, deltas, _ = setup
    engine, inbox = engine_with_push_inbox(pipe)
    pristine = weights_digest(pipe)
    deliver(inbox, deltas, parts=("te",))

    def on_step(i, total, latents):
        if i == 0:
            inbox._entry(Lora(LORA, 0.8).key, create=False).fail(Unavailable("store went away"))

    with pytest.raises(Unavailable):
        engine.generate(request(k=3), on_step=on_step)
    assert weights_digest(pipe) == pristine
    assert engine.lora_patcher.applied == ()


def test_worker_holds_the_lora_chunk_order_contract(setup):
    """protos/swiftd/v1/lora_store.proto: text-encoder deltas first. Over the real chunk stream,
    the text-encoder part is complete at the first UNet delta; a text-encoder delta after a UNet
    delta is refused (INVALID_ARGUMENT) and fails the entry instead of being silently missed."""
    pipe, deltas, _ = setup
    _, inbox = engine_with_push_inbox(pipe)
    chunks = list(deltas_to_chunks(LORA, 0.8, deltas, chunk_bytes=1 << 30))
    assert len(chunks) >= 2 and not chunks[0].last
    inbox.receive(chunks[:1])  # the text-encoder part and the first UNet delta
    entry = inbox._entry(Lora(LORA, 0.8).key, create=False)
    assert entry.text_encoder_done and not entry.complete

    _, late = engine_with_push_inbox(pipe)
    out_of_order = [
        lora_store_pb2.LoraDeltaChunk(lora_id=LORA, scale=0.8, deltas=[c], last=False)
        for chunk in deltas_to_chunks(LORA, 0.8, deltas, chunk_bytes=1 << 30)
        for c in chunk.deltas
    ]
    out_of_order.sort(key=lambda c: not c.deltas[0].parameter_name.startswith("unet."))  # UNet first
    assert out_of_order[0].deltas[0].parameter_name.startswith("unet.")
    # The request waits for the pushed LoRA (as when the gateway starts the push and the request
    # together); the refused delta fails its entry, and the request with it.
    waiting = late.fetch([(LORA, 0.8)], "r", pushed=[LORA])
    with pytest.raises(InvalidArgument, match="text-encoder delta"):
        late.receive(out_of_order)
    with pytest.raises(InvalidArgument, match="text-encoder delta"):
        waiting.text_encoder_deltas()
    # A failed entry is dropped on the next look-up, so that a new push may retry it.
    assert late._entry(Lora(LORA, 0.8).key, create=False) is None
